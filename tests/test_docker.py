"""The container's deployment: how it stops, how it reports its health, which torch it installs
and what it keeps in volumes. No Docker engine runs on CI, so the Dockerfile is read, its build
logic is run in a shell with a stand-in pip, and its command and healthcheck are run against a
real server here. The measured images (podman): docs/deploy.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from test_dockerfile import instructions

ROOT = Path(__file__).resolve().parent.parent


def only(keyword: str) -> str:
    found = [rest for k, rest in instructions() if k == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def env() -> dict[str, str]:
    """The image's ENV (key=value form), in order."""
    values = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def args() -> dict[str, str]:
    values = {}
    for keyword, rest in instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = default
    return values


def healthcheck() -> tuple[dict[str, str], str]:
    """HEALTHCHECK's options and its (shell form) command."""
    options, _, command = only("HEALTHCHECK").partition(" CMD ")
    return dict(o.removeprefix("--").split("=") for o in options.split()), command


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(s|m)", value).groups()
    return int(number) * (60 if unit == "m" else 1)


# ------------------------------------------------------------------------------- reading


def test_stops_on_sigterm_through_an_init_in_exec_form():
    assert only("STOPSIGNAL") == "SIGTERM"
    entrypoint = json.loads(only("ENTRYPOINT"))  # exec form: no shell between
    assert entrypoint == ["/usr/bin/tini", "--"]
    assert json.loads(only("CMD")) == ["python", "app.py"]
    installs = [rest for k, rest in instructions() if k == "RUN" and "apt-get install" in rest]
    assert installs and "tini" in installs[0].split() and "--no-install-recommends" in installs[0]
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]


def test_healthcheck_asks_the_served_page_with_python_only():
    options, command = healthcheck()
    assert "curl" not in command and "wget" not in command  # not in slim images
    assert "urllib.request" in command and "127.0.0.1" in command
    assert "GRADIO_SERVER_PORT" in command
    assert seconds(options["timeout"]) < seconds(options["interval"])
    assert seconds(options["start-period"]) >= 120  # a hub model loads before the port opens
    assert int(options["retries"]) >= 2


def test_a_build_argument_selects_cpu_wheels():
    assert args()["TORCH"] == "cuda"  # the default image is the one it always was
    assert args()["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    pins = re.findall(r"^(torch(?:vision)?)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert dict(pins) == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_the_hub_cache_and_the_search_indexes_are_volumes():
    volumes = json.loads(only("VOLUME"))
    values = env()
    assert values["HF_HOME"] in volumes and values["VLM_INDEX_DIR"] in volumes
    home = values["HOME"]
    assert all(v.startswith(home + "/") for v in volumes)
    # made before VOLUME, owned by the user the app runs as (else a new volume is root's)
    made = next(rest for k, rest in instructions() if k == "RUN" and "install -d" in rest)
    assert "-o user" in made and all(v in made.split() for v in volumes)
    assert f"{home}/.cache" in made.split()  # the parent too: other caches land beside


# ------------------------------------------------------------------------- running its logic


def run_torch_step(tmp_path: Path, torch: str, pip_list: str = "") -> tuple[int, list[str], str]:
    """The RUN that installs the dependencies, in /bin/sh as the build runs it, with the build
    arguments set and a pip that only records what it is asked."""
    step = next(rest for k, rest in instructions() if k == "RUN" and "$TORCH" in rest)
    shutil.copy(ROOT / "requirements.txt", tmp_path)
    calls = tmp_path / "calls"
    calls.write_text("")
    fake = tmp_path / "bin" / "pip"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        '#!/bin/sh\necho "$*" >> "$CALLS"\n[ "$1" = list ] && printf "$PIP_LIST"\nexit 0\n'
    )
    fake.chmod(0o755)
    environment = {
        "PATH": f"{fake.parent}:/usr/bin:/bin", "CALLS": str(calls), "PIP_LIST": pip_list,
        "TORCH": torch, **{k: v for k, v in args().items() if k != "TORCH"},
    }  # fmt: skip
    done = subprocess.run(
        ["/bin/sh", "-c", step], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    return done.returncode, calls.read_text().splitlines(), done.stderr


def test_cpu_build_takes_the_pinned_torch_from_the_cpu_index(tmp_path):
    rc, calls, _ = run_torch_step(tmp_path, "cpu")
    assert rc == 0
    index = "https://download.pytorch.org/whl/cpu"
    assert calls[:2] == [
        f"install --index-url {index} torch==2.14.1 torchvision==0.29.1",
        "install -r requirements.txt",
    ]
    assert calls[2:] == ["list"]  # the check that no CUDA library came in


def test_cpu_build_fails_when_cuda_libraries_slip_in(tmp_path):
    rc, _, _ = run_torch_step(tmp_path, "cpu", pip_list="nvidia-cublas 13.1.1.3\\n")
    assert rc != 0


def test_cuda_build_takes_pypis_torch_and_a_bad_value_stops_the_build(tmp_path):
    rc, calls, _ = run_torch_step(tmp_path, "cuda")
    assert rc == 0 and calls == ["install -r requirements.txt"]
    rc, calls, err = run_torch_step(tmp_path, "gpu")
    assert rc != 0 and calls == [] and "TORCH must be cpu or cuda" in err


# ------------------------------------------------------------------------- running the app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_command() -> list[str]:
    """ENTRYPOINT + CMD as the container runs them: tini where it is installed (Debian's
    package), this interpreter for `python`."""
    entrypoint, command = json.loads(only("ENTRYPOINT")), json.loads(only("CMD"))
    init = shutil.which(Path(entrypoint[0]).name)
    command = [sys.executable if c == "python" else c for c in command]
    return [init, *entrypoint[1:], *command] if init else command


def check_health(environment: dict[str, str]) -> int:
    _, command = healthcheck()
    done = subprocess.run(["/bin/sh", "-c", command], env=environment, capture_output=True)
    return done.returncode


def test_the_container_command_serves_answers_its_healthcheck_and_stops_within_2s(tmp_path):
    port = free_port()
    home = tmp_path / "home"
    environment = {
        **{k: v for k, v in env().items() if k not in ("HOME", "PATH")},
        "HOME": str(home), "TMPDIR": str(tmp_path), "LANG": "C.UTF-8",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HF_HOME": str(home / ".cache" / "huggingface"), "HF_HUB_OFFLINE": "1",
        "VLM_INDEX_DIR": str(home / ".cache" / "vlm" / "indexes"), "VLM_DEVICE": "cpu",
        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
    }  # fmt: skip
    home.mkdir()
    assert check_health(environment) != 0  # nothing serves yet
    log = tmp_path / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            container_command(), cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        started = time.monotonic()
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() - started < 120, "not serving after 120 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        assert check_health(environment) == 0
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert took < 2, f"{took:.2f} s after SIGTERM"
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM, 0), code  # tini passes on 143
    assert check_health(environment) != 0  # and the healthcheck sees it gone
