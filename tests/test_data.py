"""Dataset files in every supported format, written here from ShapeWorld renders."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from vlm import shapeworld as sw
from vlm.data import ExampleSource, FileDataset, detect_format, read_examples


def scenes(n: int, seed: int = 0) -> list[sw.Scene]:
    rng = random.Random(seed)
    return [sw.sample_scene(rng, n_objects=1) for _ in range(n)]


def write_images(folder: Path, items: list[sw.Scene], size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(items):
        paths.append(folder / f"{i:05d}.jpg")
        sw.render(scene, size).save(paths[-1], quality=95)
    return paths


def write_dataset(root: Path, fmt: str, items: list[sw.Scene], size: int = 32) -> Path:
    """A dataset of `items` in format `fmt` under `root`; returns what to pass as --data."""
    captions = [[sw.describe(s), sw.paraphrase(s, random.Random(i))] for i, s in enumerate(items)]
    if fmt == "webdataset":
        root.mkdir(parents=True, exist_ok=True)
        for shard in range(2):
            with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
                for i in range(shard, len(items), 2):
                    buffer = io.BytesIO()
                    sw.render(items[i], size).save(buffer, "PNG")
                    for suffix, data in (("png", buffer.getvalue()),
                                         ("txt", "\n".join(captions[i]).encode())):  # fmt: skip
                        info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return root
    if fmt == "karpathy":
        paths = write_images(root / "images" / "train2014", items, size)
        records = [
            {"filepath": "train2014", "filename": p.name, "cocoid": i,
             "split": ["train", "restval", "val", "test"][i % 4],
             "sentences": [{"raw": c, "tokens": c.split()} for c in captions[i]]}
            for i, p in enumerate(paths)
        ]  # fmt: skip
        path = root / "images" / "dataset_coco.json"
        path.write_text(json.dumps({"images": records, "dataset": "coco"}))
        return path
    paths = write_images(root / "images", items, size)
    if fmt == "coco":
        data = {
            "images": [{"id": 100 + i, "file_name": p.name} for i, p in enumerate(paths)],
            "annotations": [{"id": 10 * i + j, "image_id": 100 + i, "caption": c}
                            for i in range(len(paths)) for j, c in enumerate(captions[i])],
        }  # fmt: skip
        path = root / "images" / "captions_train2014.json"
        path.write_text(json.dumps(data))
        return path
    if fmt in ("csv", "tsv"):
        path = root / f"captions.{fmt}"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="," if fmt == "csv" else "\t")
            writer.writerow(["image_path", "caption"])
            for i, p in enumerate(paths):
                for caption in captions[i]:
                    writer.writerow([f"images/{p.name}", caption])
        return path
    if fmt == "folder":
        for i, p in enumerate(paths):
            p.with_suffix(".txt").write_text("\n".join(captions[i]) + "\n")
        return root / "images"
    if fmt == "qa":
        rows = [
            {"image": p.name, "question": q, "answer": a}
            for p, s in zip(paths, items, strict=True) for q, a in sw.questions(s)
        ]  # fmt: skip
        path = root / "images" / "qa.json"
        path.write_text(json.dumps(rows))
        return path
    raise ValueError(fmt)


FORMATS = ["karpathy", "coco", "csv", "tsv", "folder", "webdataset", "qa"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_images_and_texts(tmp_path, fmt):
    items = scenes(8)
    path = write_dataset(tmp_path, fmt, items)
    assert detect_format(path) == fmt
    source = ExampleSource(path, split=None)
    examples = list(source)
    assert list(source) and len(list(source)) == len(examples)  # re-iterable
    described = {sw.describe(s) for s in items}
    for example in examples:
        image = example.load()
        assert image.mode == "RGB" and image.size == (32, 32)
        assert example.texts()
        if fmt == "qa":
            assert example.texts()[0].startswith("Question: ") and " Answer: " in example.texts()[0]
    if fmt != "qa":
        assert described <= {c for e in examples for c in e.captions}
    if fmt not in ("qa", "csv", "tsv"):
        assert len(examples) == 8 and all(len(e.captions) == 2 for e in examples)
    if fmt in ("csv", "tsv"):
        assert len(examples) == 16  # one row, one example


def test_karpathy_splits_and_image_root(tmp_path):
    path = write_dataset(tmp_path, "karpathy", scenes(8))
    moved = tmp_path / "annotations" / path.name  # the JSON apart from the images, as usual
    moved.parent.mkdir()
    path.rename(moved)
    splits = {
        name: [e.load().size for e in ExampleSource(moved, split=name, images=path.parent)]
        for name in ("train", "val", "test")
    }
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 2}


def test_content_hash_is_the_same_for_the_same_image_in_any_format(tmp_path):
    items = scenes(3)
    folder = [
        e.content_hash() for e in ExampleSource(write_dataset(tmp_path / "a", "folder", items))
    ]
    coco = [e.content_hash() for e in ExampleSource(write_dataset(tmp_path / "b", "coco", items))]
    assert folder == coco and len(set(folder)) == 3


def test_webdataset_is_streamed_shard_by_shard(tmp_path):
    path = write_dataset(tmp_path, "webdataset", scenes(6))
    stream = iter(ExampleSource(path))
    first = next(stream)
    assert isinstance(first.image, bytes) and first.key == "00000"
    assert [e.key for e in stream] == ["00002", "00004", "00001", "00003", "00005"]
    pattern = str(path / "shard-{0000..0001}.tar")
    assert len(list(read_examples(pattern))) == 6


def test_bad_files_give_clear_messages(tmp_path):
    (tmp_path / "x.csv").write_text("name,words\na.png,hello\n")
    with pytest.raises(ValueError, match="image column"):
        list(ExampleSource(tmp_path / "x.csv"))
    (tmp_path / "y.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="can't tell the format"):
        ExampleSource(tmp_path / "y.json")
    with pytest.raises(ValueError, match="unknown format"):
        ExampleSource(tmp_path / "y.json", format="parquet")


def test_file_dataset_limit_and_concatenation(tmp_path):
    a = write_dataset(tmp_path / "a", "coco", scenes(4))
    b = write_dataset(tmp_path / "b", "qa", scenes(2))
    dataset = FileDataset([a, b], val_fraction=0)  # nothing held out: every example is here
    examples = list(dataset.examples())
    assert (
        sum(1 for e in examples if e.question) > 0 and sum(1 for e in examples if e.captions) == 4
    )
    assert len(list(FileDataset([a, b], limit=3, val_fraction=0).examples())) == 3
    assert len(dataset.clip_data(0, 0)) == 4


@pytest.mark.parametrize("fmt", ["csv", "folder", "coco"])
def test_the_validation_split_does_not_move_with_the_data(tmp_path, fmt):
    items = scenes(40)
    splits = []
    for place in ("here", "elsewhere/deeper"):
        data = write_dataset(tmp_path / place, fmt, items)
        dataset = FileDataset([data], val_fraction=0.25)
        splits.append(sorted(Path(e.image).name for e in dataset.val_examples()))
    assert splits[0] == splits[1] and 0 < len(splits[0]) < 40


def test_file_texts_are_all_the_training_texts_or_n_of_them(tmp_path):
    """FileDataset.texts(n, seed): every caption of the training part when they are at most
    `n` (the held-out part never), else `n` of them drawn with `seed`."""
    path = write_dataset(tmp_path, "folder", scenes(20))
    dataset = FileDataset([str(path)], val_fraction=0.25)
    every = [text for example in dataset.examples() for text in example.texts()]
    training, held = list(dataset.examples()), list(dataset.val_examples())
    assert held and len(training) + len(held) == 20 and len(every) == 2 * len(training)
    assert dataset.texts(1000, 0) == every
    drawn = dataset.texts(10, seed=3)
    assert len(drawn) == 10 and set(drawn) <= set(every)
    assert dataset.texts(10, seed=3) == drawn != dataset.texts(10, seed=4)
