"""vlm installs like a library: `pip install .` into a fresh environment, then the `vlm`
command and `import vlm` work from any folder, with the bundled model and examples found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what `pip install .` needs from a checkout (no tests, runs or virtual environments)
SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "vlm", "assets")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with vlm pip-installed from a copy of the checkout.

    Offline and in seconds: the environment sees this one's packages (torch, open_clip, …)
    through a .pth file, and pip installs vlm alone (`--no-deps`) with this environment's
    setuptools (`--no-build-isolation`). vlm itself comes only from the new environment."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        ignore = {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **ignore)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        check=True, capture_output=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    shutil.rmtree(source)  # nothing may still come from the copy
    return venv


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_vlm_command_captions_an_example_from_another_folder(installed, tmp_path):
    """`vlm caption` from an unrelated folder: the shapeworld preset and the example images
    come from the installed package, not from this checkout."""
    code = (
        "import vlm, vlm.examples as e, vlm.presets as p; print(vlm.__file__); "
        "print(p.SHAPEWORLD_DIR); print(e.shapeworld_examples()[0][0])"
    )
    where = run([installed / "bin" / "python", "-c", code], tmp_path)
    assert where.returncode == 0, where.stderr
    package, model, example = where.stdout.split()
    site = str(installed)
    assert package.startswith(site) and model.startswith(site) and example.startswith(site)
    assert not package.startswith(str(ROOT)) and Path(model, "config.json").is_file()

    result = run([installed / "bin" / "vlm", "caption", example], tmp_path)
    assert result.returncode == 0, result.stderr
    image, caption = result.stdout.strip().split("\t")
    # the bundled model reads this example right (its ground truth is in captions.json)
    truth = run([installed / "bin" / "python", "-c", "import vlm.examples as e; "
                 "print(e.shapeworld_examples()[0][1]['caption'])"], tmp_path)  # fmt: skip
    assert image == example and caption == truth.stdout.strip()


def test_console_script_is_python_dash_m_vlm(installed, tmp_path):
    script = run([installed / "bin" / "vlm", "--help"], tmp_path)
    module = run([installed / "bin" / "python", "-m", "vlm", "--help"], tmp_path)
    assert script.returncode == module.returncode == 0
    assert "caption" in script.stdout and script.stdout == module.stdout
