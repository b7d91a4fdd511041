"""`python -m vlm …` on a saved tiny pipeline, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import CAPTIONS
from test_app import ROOT, pinned_env

# nothing inherited from the caller's environment (VLM_*, HF_HOME, PYTHONPATH)
ENV = pinned_env(Path(tempfile.mkdtemp(prefix="vlm-cli-")), PYTHONPATH=str(ROOT))


def vlm(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vlm", *map(str, args)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_caption_prints_the_caption(saved_pipeline, image_files):
    path = image_files[CAPTIONS[1]]
    assert vlm("caption", path, "--model", saved_pipeline).strip() == f"{path}\t{CAPTIONS[1]}"


def test_classify_and_answer_as_json(saved_pipeline, image_files):
    folder = next(iter(image_files.values())).parent
    rows = json.loads(
        vlm("classify", folder, "--model", saved_pipeline, "--json", "--labels", ",".join(CAPTIONS))
    )
    by_image = {row["image"]: next(iter(row["labels"])) for row in rows}
    assert by_image == {str(path): caption for caption, path in image_files.items()}
    rows = json.loads(
        vlm("answer", image_files[CAPTIONS[2]], "--model", saved_pipeline, "--json",
            "--question", "what color is it?", "--choices", "red,blue,yellow")
    )  # fmt: skip
    assert rows[0]["answer"] == "yellow"


def test_index_then_search(saved_pipeline, image_files, tmp_path):
    folder = next(iter(image_files.values())).parent
    out = vlm("index", folder, "--model", saved_pipeline, "--out", tmp_path / "idx")
    assert "added 3 images" in out
    hits = vlm("search", tmp_path / "idx", CAPTIONS[0], "--model", saved_pipeline, "-k", "1")
    assert hits.split("\t")[1].strip() == str(image_files[CAPTIONS[0]])


def test_missing_files_are_a_clear_error(saved_pipeline, tmp_path):
    command = [sys.executable, "-m", "vlm", "caption", str(tmp_path / "nope")]
    command += ["--model", str(saved_pipeline)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode != 0 and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- flags, in process


def test_decoding_flags_reach_the_pipeline(saved_pipeline, image_files, monkeypatch, capsys):
    from vlm import Pipeline
    from vlm.cli import main

    path = image_files[CAPTIONS[0]]
    main(["caption", str(path), "--model", str(saved_pipeline), "--num-beams", "3"])
    assert capsys.readouterr().out.strip() == f"{path}\t{CAPTIONS[0]}"  # beam search: the same
    calls = []
    monkeypatch.setattr(Pipeline, "caption", lambda self, files, **kw: calls.append(kw) or ["x"])
    main(["caption", str(path), "--model", str(saved_pipeline), "--sample", "--temperature",
          "0.5", "--top-p", "0.8", "--max-new-tokens", "7"])  # fmt: skip
    main(["caption", str(path), "--model", str(saved_pipeline), "--num-beams", "4"])
    assert calls == [
        dict(max_new_tokens=7, num_beams=1, do_sample=True, temperature=0.5, top_p=0.8),
        dict(max_new_tokens=30, num_beams=4, do_sample=False, temperature=1.0, top_p=0.9),
    ]


def test_index_factory_builds_an_approximate_index(saved_pipeline, image_files, tmp_path, capsys):
    import faiss

    from vlm import Pipeline, SearchIndex
    from vlm.cli import main

    folder = next(iter(image_files.values())).parent
    out = tmp_path / "idx"
    main(["index", str(folder), "--model", str(saved_pipeline), "--out", str(out),
          "--factory", "IVF2,Flat"])  # fmt: skip
    assert "added 3 images" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["factory"] == "IVF2,Flat"
    index = SearchIndex.load(out, Pipeline.from_pretrained(saved_pipeline, device="cpu").encoder)
    assert faiss.extract_index_ivf(index.index).nlist == 2 and len(index) == 3
    main(["search", str(out), CAPTIONS[2], "--model", str(saved_pipeline), "-k", "1"])
    assert capsys.readouterr().out.split("\t")[1].strip() == str(image_files[CAPTIONS[2]])


def test_train_bundle_saves_the_pipeline_where_asked(saved_pipeline, tmp_path, capsys):
    from test_data import scenes, write_dataset

    from vlm import Pipeline
    from vlm.cli import main

    data = write_dataset(tmp_path / "data", "karpathy", scenes(8), size=32)
    bundle = tmp_path / "my-model"
    main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--bundle", str(bundle),
          "--encoder", f"local-dir:{saved_pipeline / 'encoder'}", "--lm",
          str(saved_pipeline / "lm"), "--mapper", "mlp", "--prefix-length", "4",
          "--prefix-steps", "2", "--prefix-batch-size", "4"])  # fmt: skip
    assert (bundle / "config.json").is_file() and not (tmp_path / "run" / "pipeline").exists()
    assert f"saved {bundle}" in capsys.readouterr().out
    loaded = Pipeline.from_pretrained(bundle, device="cpu")
    assert loaded.mapper.kind == "mlp" and loaded.mapper.prefix_length == 4


def test_eval_shapeworld_through_the_cli(capsys):
    from vlm.cli import main

    main(["eval", "shapeworld", "--n", "8", "--seed", "3", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert {"caption_exact", "vqa_overall", "retrieval_r5", "binding_color"} <= set(results)
    # chat is scored on clean scenes only: its question is what changes, not the image
    conditions = {name: set(scores) for name, scores in results.items()}
    assert {name for name, seen in conditions.items() if seen == {"clean"}} == {
        f"{split}chat_{turn}"
        for split in ("", "held_out_", "phrasing_")
        for turn in ("single_turn", "second_turn")
    }
    assert all(
        seen == {"clean", "jpeg50", "resize224"}
        for name, seen in conditions.items()
        if "chat_" not in name
    )
    # the bundled model on 8 fresh scenes (94% caption exact on 1,000)
    assert results["caption_exact"]["clean"] >= 0.75, results["caption_exact"]
    main(["eval", "shapeworld", "--n", "4"])
    table = capsys.readouterr().out
    assert table.startswith("| measure | clean | jpeg50 | resize224 | target |")
    assert "| chat_second_turn | " in table and " | – | – | " in table


def test_shapeworld_data_writes_a_folder_train_reads(tmp_path, capsys):
    """`vlm shapeworld-data`: scenes with two everyday captions each, true of the scene, in a
    folder that the trainer's file reader takes as it is."""
    from vlm import shapeworld as sw
    from vlm.cli import main
    from vlm.data import FileDataset

    main(["shapeworld-data", str(tmp_path / "mine"), "--n", "12", "--seed", "3"])
    assert (
        capsys.readouterr().out.strip() == f"wrote 12 images with captions to {tmp_path / 'mine'}"
    )
    written = sw.write_captioned_folder(tmp_path / "again", 12, seed=3)
    assert [p.name for p, _ in written] == sorted(p.name for p in (tmp_path / "mine").glob("*.png"))
    for path, scene in written:
        lines = (tmp_path / "mine" / path.name).with_suffix(".txt").read_text().splitlines()
        assert len(lines) == 2 and lines[0] != lines[1]
        for line in lines:
            words = line.lower()
            for obj in scene.objects:  # every object, left to right, in everyday words
                size = {"small": "little", "large": "big"}[obj.size]
                assert f"{size} {obj.color} {obj.shape}" in words, (line, scene)
    dataset = FileDataset([tmp_path / "mine"], val_fraction=0)
    assert len(dataset.texts(100, seed=0)) == 24  # two captions of each of the 12 images
    with pytest.raises(SystemExit):
        main(["shapeworld-data", str(tmp_path / "none"), "--n", "0"])
