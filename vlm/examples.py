"""Example images for the demo: ShapeWorld scenes with their ground truth (which scenes, and
each tab's examples made of them: `vlm.shapeworld.examples`), and a few real photos.

`python -m vlm.examples` regenerates assets/examples/ deterministically:
  shapeworld/  sw-NN-<caption>.png scenes and captions.json (caption, questions, seed, objects)
  photos/      public-domain / CC0 photos from scikit-image's bundled data, and LICENSES.md
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .images import load_image
from .paths import ASSETS
from .shapeworld import examples as shapeworld
from .tasks import Case

EXAMPLES_DIR = ASSETS / "examples"
PHOTO_SIDE = 512  # longer side of the saved photos, in pixels
PHOTO_QUALITY = 85
# skimage.data function (and file stem): (what it shows, source, licence), from its docstring
PHOTOS = {
    "astronaut": (
        "Eileen Collins, NASA astronaut",
        "NASA Great Images database, https://flic.kr/p/r9qvLn",
        "Public domain (no known copyright restrictions)",
    ),
    "coffee": (
        "A cup of coffee, courtesy of Pikolo Espresso Bar",
        "Photograph by Rachel Michetti",
        "CC0 (no copyright restrictions)",
    ),
    "chelsea": (
        "Chelsea the cat",
        "Photograph by Stefan van der Walt",
        "CC0 (no copyright restrictions)",
    ),
    "rocket": (
        "Launch of DSCOVR on a Falcon 9",
        "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/",
        "Public domain (released by SpaceX)",
    ),
}


def write_photos(folder: Path) -> None:
    """Save the PHOTOS as small JPEGs and write LICENSES.md."""
    from skimage import data  # only needed to regenerate the files

    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Example photos",
        "",
        "From scikit-image's bundled sample data (`skimage.data`), resized so the longer side",
        f"is at most {PHOTO_SIDE} px and saved as JPEG quality {PHOTO_QUALITY} by",
        "`python -m vlm.examples`. Sources and licences as stated in scikit-image's docstrings.",
        "",
        "| File | Shows | Source | Licence |",
        "| --- | --- | --- | --- |",
    ]
    for function, (shows, source, licence) in PHOTOS.items():
        image = load_image(getattr(data, function)())
        image.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
        image.save(folder / f"{function}.jpg", quality=PHOTO_QUALITY, optimize=True)
        lines.append(
            f"| {function}.jpg | {shows} | {source} (`skimage.data.{function}`) | {licence} |"
        )
    (folder / "LICENSES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_examples(folder: Path = EXAMPLES_DIR) -> None:
    """Regenerate folder/shapeworld and folder/photos."""
    shapeworld.write_scenes(folder / "shapeworld")
    write_photos(folder / "photos")


# -----------------------------------------------------------------------------
# accessors for the app


def shapeworld_examples(folder: Path = EXAMPLES_DIR) -> list[tuple[Path, dict]]:
    """(png path, ground-truth entry) for each ShapeWorld example, in file-name order."""
    return shapeworld.scenes(folder / "shapeworld")


def caption_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Caption tab's examples (vlm.shapeworld.examples)."""
    return shapeworld.caption_cases(folder / "shapeworld")


def question_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Ask tab's examples (vlm.shapeworld.examples)."""
    return shapeworld.question_cases(folder / "shapeworld")


def few_shot_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Few-shot tab's examples (vlm.shapeworld.examples)."""
    return shapeworld.few_shot_cases(folder / "shapeworld")


def explain_examples(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """The Explain tab's rows ([image, phrase]; vlm.shapeworld.examples)."""
    return shapeworld.explain_examples(folder / "shapeworld")


def _rows_and_labels(cases: list[Case]) -> tuple[list[list], list[str]]:
    return [c.row for c in cases], [c.label for c in cases]


def caption_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list[str]], list[str]]:
    """Rows ([image]) and labels of `caption_cases`."""
    return _rows_and_labels(caption_cases(folder))


def question_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list[str]], list[str]]:
    """Rows ([image, question, choices]) and labels of `question_cases`."""
    return _rows_and_labels(question_cases(folder))


def few_shot_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list], list[str]]:
    """Rows and labels of the attribute lists of `few_shot_cases`."""
    cases = few_shot_cases(folder)
    return _rows_and_labels([c for c in cases if not c.label.startswith("2-shot captions")])


def photo_labels(folder: Path = EXAMPLES_DIR) -> list[str]:
    """What each of `photo_examples` shows ("photo: Chelsea the cat")."""
    return [f"photo: {PHOTOS[p.stem][0] if p.stem in PHOTOS else p.stem}"
            for p in photo_examples(folder)]  # fmt: skip


def _says(expected: str, output: str, kind: str) -> bool:
    if kind == "few_shot" and " " not in expected:  # an attribute: the continuation's first word
        return output.split()[:1] == [expected]
    return output.strip() == expected


def checked_labels(cases: list[Case], outputs: list[str], kind: str = "") -> list[str]:
    """Each case's label, and for one whose output (what the model gave for its row) is not
    what it should be, "known failure" with what the model says: a label never promises a
    result the serving model does not give."""
    labels = []
    for case, output in zip(cases, outputs, strict=True):
        if case.expected is None or _says(case.expected, output, kind):
            labels.append(case.label)
        else:
            shown = output if len(output) <= 60 else output[:59] + "…"
            labels.append(f"known failure: {case.label} (the model says {shown!r})")
    return labels


def photo_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """The example photos, sorted by name."""
    return sorted((folder / "photos").glob("*.jpg"))


def all_example_images(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """ShapeWorld scenes first, then photos."""
    return [path for path, _ in shapeworld_examples(folder)] + photo_examples(folder)


if __name__ == "__main__":
    write_examples()
    files = [p for p in sorted(EXAMPLES_DIR.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KB, to {EXAMPLES_DIR}")
