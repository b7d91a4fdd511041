"""Where vlm's bundled files are: `assets/` beside the package in a checkout (or an editable
install), `vlm/assets/` inside it once installed (pyproject.toml maps one onto the other)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS = (
    PACKAGE_DIR / "assets" if (PACKAGE_DIR / "assets").is_dir() else PACKAGE_DIR.parent / "assets"
)
