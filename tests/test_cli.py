"""`python -m vlm …` on a saved tiny pipeline, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import CAPTIONS

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


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
