"""Example images for the demo: ShapeWorld scenes with their ground truth, and a few real photos.

`python -m vlm.examples` regenerates assets/examples/ deterministically:
  shapeworld/  sw-NN-<caption>.png scenes and captions.json (caption, questions, seed, objects)
  photos/      public-domain / CC0 photos from scikit-image's bundled data, and LICENSES.md
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from . import shapeworld as sw
from .images import load_image
from .paths import ASSETS

EXAMPLES_DIR = ASSETS / "examples"
CAPTIONS_FILE = "captions.json"

# example i is sample_scene(random.Random(SEED + i), *PLAN[i]); this seed's train examples show
# all 5 shapes and all 7 colours
SEED = 1567
SCENE_SIZE = 128
# (n_objects, split) of each example, in order: a mix of train scenes, then two held-out ones
PLAN = (
    [(1, "train")] * 4
    + [(2, "train")] * 4
    + [(3, "train")] * 4
    + [(1, "held_out"), (2, "held_out")]
)

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


def slug(caption: str) -> str:
    """A file-name friendly caption naming every object: "small_red_star-large_green_circle"
    for "a small red star left of a large green circle"."""
    phrases = [phrase.split(" ", 1)[1] for phrase in caption.split(" left of ")]
    return "-".join(phrase.replace(" ", "_") for phrase in phrases)


def scene_entry(scene: sw.Scene, seed: int, split: str) -> dict:
    """The ground truth stored for one example scene in captions.json."""
    return {
        "caption": sw.describe(scene),
        "questions": [list(qa) for qa in sw.questions(scene)],
        "seed": seed,
        "n_objects": len(scene.objects),
        "split": split,
        "size": SCENE_SIZE,
        "objects": [dataclasses.asdict(o) for o in scene.objects],
    }


def scene_from_entry(entry: dict) -> sw.Scene:
    """Rebuild the Scene stored in a captions.json entry."""
    return sw.Scene(tuple(sw.Obj(**o) for o in entry["objects"]))


def write_shapeworld(folder: Path) -> None:
    """Render the PLAN's scenes as PNGs and write their ground truth to captions.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("sw-*.png"):
        old.unlink()
    truth = {}
    for i, (n_objects, split) in enumerate(PLAN):
        seed = SEED + i
        scene = sw.sample_scene(random.Random(seed), n_objects, split)
        name = f"sw-{i + 1:02d}-{slug(sw.describe(scene))}.png"
        sw.render(scene, SCENE_SIZE).save(folder / name, optimize=True)
        truth[name] = scene_entry(scene, seed, split)
    text = json.dumps(truth, indent=2, ensure_ascii=False) + "\n"
    (folder / CAPTIONS_FILE).write_text(text, encoding="utf-8")


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
    write_shapeworld(folder / "shapeworld")
    write_photos(folder / "photos")


# -----------------------------------------------------------------------------
# accessors for the app


def shapeworld_examples(folder: Path = EXAMPLES_DIR) -> list[tuple[Path, dict]]:
    """(png path, ground-truth entry) for each ShapeWorld example, in file-name order."""
    path = folder / "shapeworld" / CAPTIONS_FILE
    if not path.is_file():
        return []
    truth = json.loads(path.read_text(encoding="utf-8"))
    return [(folder / "shapeworld" / name, truth[name]) for name in sorted(truth)]


def _by_name(folder: Path) -> dict[str, tuple[str, dict]]:
    return {path.name[:5]: (str(path), entry) for path, entry in shapeworld_examples(folder)}


def _never_seen(entry: dict) -> list[str]:
    return [f"{o['color']} {o['shape']}" for o in entry["objects"]
            if (o["color"], o["shape"]) in sw.HELD_OUT]  # fmt: skip


class Case(NamedTuple):
    """One example of a tab: its inputs (a row of gr.Examples), what its label says it shows,
    and the output the model should give (None: no single right one)."""

    row: list
    label: str
    expected: str | None


def _objects(entry: dict) -> str:
    """What a scene shows, in a label: "2 objects: large yellow circle, small green circle"."""
    n = entry["n_objects"]
    things = ", ".join(f"{o['size']} {o['color']} {o['shape']}" for o in entry["objects"])
    return f"{n} object{'s' * (n > 1)}: {things}"


def caption_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Caption tab's scenes, each labelled with what it shows, those holding a HELD_OUT
    combination as never seen with any image; expected: the scene's caption."""
    cases = []
    for path, entry in shapeworld_examples(folder):
        never = _never_seen(entry)
        label = f"never seen with any image ({', '.join(never)}): " if never else ""
        cases.append(Case([str(path)], label + _objects(entry), entry["caption"]))
    return cases


def caption_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list[str]], list[str]]:
    """Rows ([image]) and labels of `caption_cases`."""
    cases = caption_cases(folder)
    return [c.row for c in cases], [c.label for c in cases]


def photo_labels(folder: Path = EXAMPLES_DIR) -> list[str]:
    """What each of `photo_examples` shows ("photo: Chelsea the cat")."""
    return [f"photo: {PHOTOS[p.stem][0] if p.stem in PHOTOS else p.stem}"
            for p in photo_examples(folder)]  # fmt: skip


def question_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Ask tab's examples (see `question_examples`), with their answers."""
    scenes = _by_name(folder)
    if not scenes:
        return []
    cases = []

    def case(key: str, question: str, label: str, answer: str, choices: str = "") -> None:
        path, entry = scenes[key]
        cases.append(Case([path, question, choices], f"{label} · {_objects(entry)}", answer))

    for key in ("sw-01", "sw-05", "sw-09"):
        question, answer = scenes[key][1]["questions"][0]
        case(key, question, "a phrasing seen in training", answer)
    entry = scenes["sw-13"][1]
    first = entry["objects"][0]
    case("sw-13", f"what shape is the {first['color']} object?",
         f"never seen with any image: {', '.join(_never_seen(entry))}", first["shape"])  # fmt: skip
    second = scenes["sw-05"][1]["objects"][1]
    case("sw-05", f"how big is the {second['color']} {second['shape']}?",
         "a phrasing never asked of any image", second["size"])  # fmt: skip
    case("sw-02", "what shape is it?", "a phrasing never asked of any image",
         scenes["sw-02"][1]["objects"][0]["shape"])  # fmt: skip
    case("sw-01", "how many shapes are there?", "choices scored by the LM",
         sw.NUMBER_WORDS[scenes["sw-01"][1]["n_objects"]], "one, two, three")  # fmt: skip
    return cases


def question_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list[str]], list[str]]:
    """Rows ([image, question, choices]) and labels for the Ask tab: seen questions, a
    question about a HELD_OUT combination, and questions in HELD_OUT_FORMS (phrasings the LM
    read in text only, never asked of any image)."""
    cases = question_cases(folder)
    return [c.row for c in cases], [c.label for c in cases]


def explain_examples(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """Rows ([image, phrase]) for the Explain tab: scenes of two or three objects, each with
    a phrase naming one of its objects."""
    rows = []
    for path, entry in shapeworld_examples(folder):
        if entry["n_objects"] > 1 and len(rows) < 3:
            scene = scene_from_entry(entry)
            rows.append([str(path), scene.objects[-1].phrase])
    return rows


def few_shot_cases(folder: Path = EXAMPLES_DIR) -> list[Case]:
    """The Few-shot tab's examples: rows ([image, text] × 3, query image, prompt), labels and
    the query's value. 2-shot lists whose query's value is in neither example, in a seen
    format and in formats that appear nowhere in training (HELD_OUT_KEYS,
    HELD_OUT_SEPARATORS), and 2-shot captions. The colour lists need the tab's "Describe each
    image first" (docs/shapeworld.md, few-shot)."""
    scenes = _by_name(folder)
    if not scenes:
        return []
    one = {key: (path, scene_from_entry(entry))
           for key, (path, entry) in scenes.items() if entry["n_objects"] == 1}  # fmt: skip
    tasks = [  # (attribute, key, separator, two example scenes, query scene, label)
        ("shape", "Shape", ": ", ("sw-01", "sw-02"), "sw-03", "2-shot shape, a seen format"),
        ("color", "Colour", ": ", ("sw-01", "sw-04"), "sw-02", "2-shot colour, a seen format"),
        ("size", "Scale", ": ", ("sw-01", "sw-04"), "sw-02",
         "2-shot size, key never seen in training"),
        ("shape", "Form", ": ", ("sw-03", "sw-04"), "sw-02",
         "2-shot shape, key never seen in training"),
        ("color", "Hue", " => ", ("sw-01", "sw-04"), "sw-02",
         "2-shot colour, key and separator never seen in training"),
    ]  # fmt: skip
    cases = []
    for attribute, key, separator, shots, query, label in tasks:
        row: list = []
        for name in shots:
            path, scene = one[name]
            row += [path, f"{key}{separator}{sw.attribute(scene, attribute)}"]
        query_path, query_scene = one[query]
        cases.append(Case([*row, None, None, query_path, f"{key}{separator}".rstrip()], label,
                          sw.attribute(query_scene, attribute)))  # fmt: skip
    (first, a), (second, b), (third, c) = (scenes[k] for k in ("sw-01", "sw-02", "sw-03"))
    cases.append(Case([first, f"Caption: {a['caption']}", second, f"Caption: {b['caption']}",
                       None, None, third, "Caption:"],
                      f"2-shot captions: {_objects(c)}", c["caption"]))  # fmt: skip
    return cases


def few_shot_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[list], list[str]]:
    """Rows and labels of the attribute lists of `few_shot_cases`."""
    cases = [c for c in few_shot_cases(folder) if not c.label.startswith("2-shot captions")]
    return [c.row for c in cases], [c.label for c in cases]


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
