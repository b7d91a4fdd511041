"""The CLI's flags that tests/test_cli.py does not reach, run in process on the tiny saved
pipeline: caption/answer --stream and --json, answer --choices, classify --top, search -k and
an image query, index run twice, eval captions --limit/--max-new-tokens/--out."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import CAPTIONS, COLOR_QUESTION

from vlm.cli import main


@pytest.fixture
def run(capsys, saved_pipeline):
    """`vlm <args> --model <tiny>` in process: (stdout, stderr)."""

    def call(*args) -> tuple[str, str]:
        main([*map(str, args), "--model", str(saved_pipeline)])
        captured = capsys.readouterr()
        return captured.out, captured.err

    return call


@pytest.fixture(scope="module")
def folder(image_files):
    return next(iter(image_files.values())).parent


def test_caption_stream_prints_the_same_lines_as_caption(run, image_files):
    paths = [image_files[c] for c in CAPTIONS]
    plain, _ = run("caption", *paths)
    streamed, _ = run("caption", *paths, "--stream")
    assert streamed.replace("\r", "") == plain  # one line each, whatever was rewritten
    assert plain.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, CAPTIONS, strict=True)]
    rows = json.loads(run("caption", *paths, "--stream", "--json")[0])  # --json wins
    assert rows == [{"image": str(p), "caption": c} for p, c in zip(paths, CAPTIONS, strict=True)]


def test_answer_stream_and_choices(run, image_files):
    paths = [image_files[c] for c in CAPTIONS]
    colours = [c.split()[2] for c in CAPTIONS]
    plain, _ = run("answer", *paths, "--question", COLOR_QUESTION)
    streamed, _ = run("answer", *paths, "--question", COLOR_QUESTION, "--stream")
    want = [f"{p}\t{c}" for p, c in zip(paths, colours, strict=True)]
    assert plain.splitlines() == streamed.replace("\r", "").splitlines() == want
    # --choices: one of them, the right one, even listed in another order with spaces
    chosen, _ = run("answer", *paths, "--question", COLOR_QUESTION, "--choices",
                    "yellow, blue ,red,green", "--stream")  # fmt: skip
    assert chosen.splitlines() == want
    rows = json.loads(run("answer", *paths, "--question", COLOR_QUESTION, "--choices",
                          "green,red,blue,yellow", "--json")[0])  # fmt: skip
    for row, colour in zip(rows, colours, strict=True):
        assert row["answer"] == colour and set(row["scores"]) == {"green", "red", "blue", "yellow"}
        assert sum(row["scores"].values()) == pytest.approx(1, abs=1e-4)
        assert max(row["scores"], key=row["scores"].get) == colour


@pytest.mark.parametrize("top", [1, 2, 3])
def test_classify_top_prints_that_many_labels_best_first(run, image_files, top):
    path = image_files[CAPTIONS[1]]
    out, _ = run("classify", path, "--labels", ",".join(CAPTIONS), "--top", top)
    name, labels = out.strip().split("\t")
    shown = [label.rsplit(" ", 1) for label in labels.split(", ")]
    assert name == str(path) and len(shown) == top
    assert shown[0][0] == CAPTIONS[1]
    probabilities = [float(p) for _, p in shown]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1


def test_search_k_and_an_image_query_and_index_run_twice(run, image_files, folder, tmp_path):
    out, err = run("index", image_files[CAPTIONS[0]], "--out", tmp_path / "idx")
    assert "added 1 images; 1 in" in out
    out, err = run("index", folder, "--out", tmp_path / "idx")  # extends it, skips the copy
    assert "added 2 images; 3 in" in out and "duplicate" in err
    for k in (1, 2, 3, 10):
        hits, _ = run("search", tmp_path / "idx", CAPTIONS[2], "-k", k)
        lines = hits.splitlines()
        assert len(lines) == min(k, 3)
        assert lines[0].split("\t")[1] == str(image_files[CAPTIONS[2]])
        scores = [float(line.split("\t")[0]) for line in lines]
        assert scores == sorted(scores, reverse=True)
    hits = json.loads(run("search", tmp_path / "idx", image_files[CAPTIONS[1]], "-k", 1,
                          "--json")[0])  # fmt: skip
    assert hits[0]["item"] == str(image_files[CAPTIONS[1]]) and hits[0]["score"] > 0.99


@pytest.fixture(scope="module")
def captions_csv(image_files, tmp_path_factory):
    """Each tiny image twice (6 rows, 3 images), with its caption: what the model writes."""
    path = tmp_path_factory.mktemp("eval") / "captions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption"])
        for caption in CAPTIONS * 2:
            writer.writerow([str(image_files[caption]), caption])
    return path


def test_eval_captions_out_limit_and_max_new_tokens(run, captions_csv, image_files, tmp_path):
    out, _ = run("eval", "captions", "--data", captions_csv, "--out", tmp_path / "all.json",
                 "--json")  # fmt: skip
    printed, written = json.loads(out), json.loads((tmp_path / "all.json").read_text())
    assert "predictions" not in printed and printed["scores"] == written["scores"]
    assert written["images"] == 3 and len(written["predictions"]) == 3
    by_key = {p["caption"]: p for p in written["predictions"]}
    assert set(by_key) == set(CAPTIONS)  # every image's own caption, once
    assert all(by_key[c]["references"] == [c, c] for c in CAPTIONS)
    assert written["scores"]["BLEU-4"] == pytest.approx(1, abs=1e-3)
    # --limit: the first rows only; --max-new-tokens: captions cut, and said to be
    out, err = run("eval", "captions", "--data", captions_csv, "--limit", 2, "--max-new-tokens",
                   2, "--out", tmp_path / "cut.json")  # fmt: skip
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["images"] == 2 and len(cut["predictions"]) == 2
    assert all(len(p["caption"].split()) <= 2 for p in cut["predictions"])
    assert cut["scores"]["BLEU-4"] < 0.5
    assert "2 of 2 outputs reached --max-new-tokens 2" in err
    assert "| BLEU-4 |" in out and "note: 2 of 2 outputs" in out
