"""The demo's ShapeWorld example scenes: which scenes (`PLAN`), how they are written (PNGs and
captions.json with their ground truth) and each tab's examples made from them, every one with
the output the model should give (a `vlm.tasks.Case`).

Scenes are referred to by their place in the plan (`_Scenes.one[0]`: the first one-object
scene of the training split), not by file name.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from ..tasks import Case
from . import world as sw

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


def write_scenes(folder: Path) -> None:
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


def scenes(folder: Path) -> list[tuple[Path, dict]]:
    """(png path, ground-truth entry) for each scene written in `folder`, in plan order."""
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        return []
    truth = json.loads(path.read_text(encoding="utf-8"))
    return [(folder / name, truth[name]) for name in sorted(truth)]


class _Scenes:
    """The written scenes by their role in the plan: `one`, `two`, `three` (train scenes of
    that many objects) and `held_out`, each a list of (path as str, entry) in plan order."""

    def __init__(self, folder: Path):
        self.all = [(str(path), entry) for path, entry in scenes(folder)]
        role = {(1, "train"): "one", (2, "train"): "two", (3, "train"): "three"}
        self.one, self.two, self.three, self.held_out = [], [], [], []
        for path, entry in self.all:
            key = role.get((entry["n_objects"], entry["split"]), "held_out")
            getattr(self, key).append((path, entry))


def _never_seen(entry: dict) -> list[str]:
    return [f"{o['color']} {o['shape']}" for o in entry["objects"]
            if (o["color"], o["shape"]) in sw.HELD_OUT]  # fmt: skip


def _objects(entry: dict) -> str:
    """What a scene shows, in a label: "2 objects: large yellow circle, small green circle"."""
    n = entry["n_objects"]
    things = ", ".join(f"{o['size']} {o['color']} {o['shape']}" for o in entry["objects"])
    return f"{n} object{'s' * (n > 1)}: {things}"


def caption_cases(folder: Path) -> list[Case]:
    """The Caption tab's scenes, each labelled with what it shows, those holding a HELD_OUT
    combination as never seen with any image; expected: the scene's caption."""
    cases = []
    for path, entry in scenes(folder):
        never = _never_seen(entry)
        label = f"never seen with any image ({', '.join(never)}): " if never else ""
        cases.append(Case([str(path)], label + _objects(entry), entry["caption"]))
    return cases


def question_cases(folder: Path) -> list[Case]:
    """The Ask tab's examples with their answers: questions in phrasings seen in training, a
    question about a HELD_OUT combination, questions in HELD_OUT_FORMS (phrasings the LM read
    in text only, never asked of any image) and a question with choices."""
    found = _Scenes(folder)
    if not found.all:
        return []
    cases = []

    def case(scene, question: str, label: str, answer: str, choices: str = "") -> None:
        path, entry = scene
        cases.append(Case([path, question, choices], f"{label} · {_objects(entry)}", answer))

    for scene in (found.one[0], found.two[0], found.three[0]):
        question, answer = scene[1]["questions"][0]
        case(scene, question, "a phrasing seen in training", answer)
    held = found.held_out[0]
    first, never = held[1]["objects"][0], ", ".join(_never_seen(held[1]))
    case(held, f"what shape is the {first['color']} object?",
         f"never seen with any image: {never}", first["shape"])  # fmt: skip
    second = found.two[0][1]["objects"][1]
    case(found.two[0], f"how big is the {second['color']} {second['shape']}?",
         "a phrasing never asked of any image", second["size"])  # fmt: skip
    case(found.one[1], "what shape is it?", "a phrasing never asked of any image",
         found.one[1][1]["objects"][0]["shape"])  # fmt: skip
    case(found.one[0], "how many shapes are there?", "choices scored by the LM",
         sw.NUMBER_WORDS[found.one[0][1]["n_objects"]], "one, two, three")  # fmt: skip
    return cases


def explain_examples(folder: Path) -> list[list[str]]:
    """Rows ([image, phrase]) for the Explain tab: scenes of two or three objects, each with
    a phrase naming one of its objects."""
    rows = []
    for path, entry in scenes(folder):
        if entry["n_objects"] > 1 and len(rows) < 3:
            rows.append([str(path), scene_from_entry(entry).objects[-1].phrase])
    return rows


def few_shot_cases(folder: Path) -> list[Case]:
    """The Few-shot tab's examples: rows ([image, text] × 3, query image, prompt), labels and
    the query's value. 2-shot lists whose query's value is in neither example, in a seen
    format and in formats that appear nowhere in training (HELD_OUT_KEYS,
    HELD_OUT_SEPARATORS), and 2-shot captions. The colour lists need the tab's "Describe each
    image first" (docs/shapeworld.md, few-shot)."""
    found = _Scenes(folder)
    if not found.all:
        return []
    one = [(path, scene_from_entry(entry)) for path, entry in found.one]
    tasks = [  # (attribute, key, separator, two example scenes, query scene, label)
        ("shape", "Shape", ": ", (0, 1), 2, "2-shot shape, a seen format"),
        ("color", "Colour", ": ", (0, 3), 1, "2-shot colour, a seen format"),
        ("size", "Scale", ": ", (0, 3), 1, "2-shot size, key never seen in training"),
        ("shape", "Form", ": ", (2, 3), 1, "2-shot shape, key never seen in training"),
        ("color", "Hue", " => ", (0, 3), 1,
         "2-shot colour, key and separator never seen in training"),
    ]  # fmt: skip
    cases = []
    for attribute, key, separator, shots, query, label in tasks:
        row: list = []
        for index in shots:
            path, scene = one[index]
            row += [path, f"{key}{separator}{sw.attribute(scene, attribute)}"]
        query_path, query_scene = one[query]
        cases.append(Case([*row, None, None, query_path, f"{key}{separator}".rstrip()], label,
                          sw.attribute(query_scene, attribute)))  # fmt: skip
    (first, a), (second, b), (third, c) = found.one[:3]
    cases.append(Case([first, f"Caption: {a['caption']}", second, f"Caption: {b['caption']}",
                       None, None, third, "Caption:"],
                      f"2-shot captions: {_objects(c)}", c["caption"]))  # fmt: skip
    return cases
