"""Mistakes a new user makes with `vlm train` and `vlm eval` end in one line that says what is
wrong and what to do: exit status 2 and no traceback."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import ROOT, pinned_env
from test_data import scenes, write_dataset, write_images
from test_own_data import save_random_pipeline

from vlm.cli import main as cli


def fails(capsys, *args: str) -> str:
    """The error line of a CLI call that must fail as argparse fails (status 2)."""
    with pytest.raises(SystemExit) as stop:
        cli([*map(str, args)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    """Untrained tiny parts: these tests are about messages, not about what a model learned."""
    return save_random_pipeline(tmp_path_factory.mktemp("parts") / "pipeline")


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("csv"), "csv", scenes(6))


def train(data, out, saved, *extra):
    return ["train", "--data", data, "--out", out, "--encoder", f"local-dir:{saved / 'encoder'}",
            "--lm", saved / "lm", "--prefix-steps", "2", "--no-eval", *extra]  # fmt: skip


def test_missing_lm_folder_says_so(capsys, csv_data, saved_pipeline, tmp_path):
    err = fails(capsys, *train(csv_data, tmp_path / "run", saved_pipeline)[:-5],
                "--lm", "./runs/no-such-lm", "--prefix-steps", "2")  # fmt: skip
    assert "--lm ./runs/no-such-lm: no such folder" in err
    assert "hub id" not in err  # a path, not a hub id: said before anything loads


def test_lm_hub_id_offline_says_hub_ids_need_the_network(capsys, csv_data, saved_pipeline,
                                                         tmp_path):  # fmt: skip
    args = train(csv_data, tmp_path / "run", saved_pipeline)
    args[args.index("--lm") + 1] = "someone/not-cached-lm"
    err = fails(capsys, *args)
    assert "--lm someone/not-cached-lm: no such folder" in err
    assert "hub ids need the network" in err


def test_lm_folder_without_a_model_says_so(capsys, csv_data, saved_pipeline, tmp_path):
    args = train(csv_data, tmp_path / "run", saved_pipeline)
    args[args.index("--lm") + 1] = tmp_path
    assert "not a Hugging Face model folder (no config.json)" in fails(capsys, *args)


def test_encoder_folder_needs_local_dir(capsys, csv_data, saved_pipeline, tmp_path):
    args = train(csv_data, tmp_path / "run", saved_pipeline)
    folder = saved_pipeline / "encoder"
    args[args.index("--encoder") + 1] = folder
    err = fails(capsys, *args)
    assert f"--encoder {folder} is a folder: write --encoder local-dir:{folder}" in err
    assert err.count("\n") == 1  # one line, not open_clip's list of model names


def test_unknown_encoder_name_and_empty_local_dir(capsys, csv_data, saved_pipeline, tmp_path):
    args = train(csv_data, tmp_path / "run", saved_pipeline)
    args[args.index("--encoder") + 1] = "ViT-Q-99"
    assert "--encoder ViT-Q-99: not an open_clip model name" in fails(capsys, *args)
    args[args.index("--encoder") + 1] = f"local-dir:{tmp_path}"
    assert "is not an open_clip folder (no open_clip_config.json" in fails(capsys, *args)


def test_missing_data_says_so(capsys, saved_pipeline, tmp_path):
    err = fails(capsys, *train(tmp_path / "nope.csv", tmp_path / "run", saved_pipeline))
    assert f"no such data file or folder: {tmp_path / 'nope.csv'}" in err
    err = fails(capsys, "train", tmp_path / "nope", "--out", tmp_path / "run")  # positional
    assert f"no such data file or folder: {tmp_path / 'nope'}" in err


def test_csv_without_the_columns_names_them(capsys, saved_pipeline, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("file,description\na.png,a cat\n")
    err = fails(capsys, *train(path, tmp_path / "run", saved_pipeline))
    assert "needs an image column (image_path" in err and "caption column (caption" in err
    assert "it has file, description" in err


def with_missing_image(csv_path: Path) -> Path:
    """The CSV with row 3 (file line 3) naming an image that is not there."""
    rows = list(csv.reader(csv_path.open()))
    rows.insert(2, ["images/does_not_exist.png", "a picture that is gone"])
    bad = csv_path.with_name("bad.csv")
    with bad.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return bad


def test_missing_image_is_skipped_with_its_row_or_fatal_with_strict(
    capsys, csv_data, saved_pipeline, tmp_path
):
    bad = with_missing_image(csv_data)
    message = ("bad.csv row 3: no image file images/does_not_exist.png (paths are relative to "
               f"the folder of bad.csv ({bad.parent}))")  # fmt: skip
    err = fails(capsys, *train(bad, tmp_path / "strict", saved_pipeline, "--strict"))
    assert message in err
    cli([*map(str, train(bad, tmp_path / "run", saved_pipeline, "--val-fraction", "0"))])
    out = capsys.readouterr().out
    assert "skipped 1 of 13 rows" in out and message in out and "12 examples" in out


def test_eval_skips_bad_rows_like_training_and_strict_stops(capsys, csv_data, saved_pipeline):
    bad = with_missing_image(csv_data)
    cli(["eval", "captions", "--data", str(bad), "--model", str(saved_pipeline)])
    captured = capsys.readouterr()
    assert "skipped 1 row (--strict" in captured.err
    assert "bad.csv row 3: no image file" in captured.err
    assert "| CIDEr |" in captured.out and "skipped 1 bad rows" in captured.out
    err = fails(capsys, "eval", "captions", "--data", bad, "--model", saved_pipeline, "--strict")
    assert "bad.csv row 3: no image file images/does_not_exist.png" in err


def test_a_real_shell_sees_one_line_and_status_2(csv_data, tmp_path):
    env = pinned_env(tmp_path, PYTHONPATH=str(ROOT))  # nothing inherited from the caller
    result = subprocess.run(
        [sys.executable, "-m", "vlm", "train", "--data", str(csv_data), "--out", str(tmp_path),
         "--encoder", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --encoder {tmp_path} is a folder: write --encoder local-dir:{tmp_path} "
        "to load an open_clip folder"
    ]


@pytest.mark.parametrize("model", ["blip2-opt-2.7b", "clipcap-coco", "someone/not-cached"])
def test_a_model_that_cannot_be_loaded_is_one_line(capsys, monkeypatch, tmp_path, model):
    """Offline with an empty cache, a preset or hub id is not there: one line, not
    transformers' OSError stack."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    image = sorted(
        (Path(__file__).parents[1] / "assets" / "examples" / "shapeworld").glob("*.png")
    )[0]
    err = fails(capsys, "caption", image, "--model", model)
    assert err.startswith(f"error: {model} could not be loaded: ") and err.count("\n") == 1


def test_a_saved_folder_with_damaged_weights_is_one_line(capsys, saved_pipeline, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_pipeline, damaged)
    (damaged / "mapper.safetensors").write_bytes(b"not safetensors")
    image = write_images(tmp_path / "images", scenes(1))[0]
    err = fails(capsys, "caption", image, "--model", damaged)
    assert err.startswith(f"error: {damaged} could not be loaded: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(caption_prmpt="Caption:"),
            "unknown key 'caption_prmpt' (did you mean 'caption_prompt'?)",
        ),
        (
            lambda c: c["mapper"].update(prefix_lenght=4),
            "mapper: unknown key 'prefix_lenght' (did you mean 'prefix_length'?)",
        ),
        (lambda c: c.pop("mapper"), "config.json lacks mapper"),
    ],
)
def test_a_config_with_a_key_it_does_not_know_is_refused_by_name(
    capsys, saved_pipeline, tmp_path, edit, message
):
    """A typo in config.json is named, not silently dropped (the model would load without it)."""
    folder = tmp_path / "typo"
    shutil.copytree(saved_pipeline, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    image = write_images(tmp_path / "images", scenes(1))[0]
    err = fails(capsys, "caption", image, "--model", folder)
    assert message in err and err.count("\n") == 1
