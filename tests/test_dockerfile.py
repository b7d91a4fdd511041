"""No Docker engine runs here, so the Dockerfile is checked by reading it for the essentials."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            lines.append((keyword.upper(), rest.strip()))
            current = ""
    return lines


def test_dockerfile_essentials():
    steps = instructions()
    keywords = [k for k, _ in steps]
    assert steps[0][0] == "FROM" and "python:3.11-slim" in steps[0][1]
    assert any(k == "RUN" and "--uid 1000" in v for k, v in steps)
    assert ("USER", "user") in steps
    assert keywords.index("USER") > keywords.index("RUN")  # installs as root, runs as 1000
    assert any(k == "RUN" and "pip install -r requirements.txt" in v for k, v in steps)
    copies = [v for k, v in steps if k == "COPY"]
    assert copies[0].endswith("requirements.txt .")  # dependencies cached before the code
    assert ("EXPOSE", "7860") in steps
    assert any(k == "ENV" and "GRADIO_SERVER_NAME=0.0.0.0" in v for k, v in steps)
    assert steps[-1] == ("CMD", '["python", "app.py"]')
    assert (ROOT / "app.py").is_file() and (ROOT / "requirements.txt").is_file()


def test_dockerignore_keeps_the_image_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
