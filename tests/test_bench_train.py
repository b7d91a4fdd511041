"""`python -m bench.train_prefix` on toy sizes: the real trainer runs each mapper from the
feature cache and the report holds rates and the COCO estimate. Nothing asserts on speed."""

from __future__ import annotations

import json

import pytest

from bench import train_prefix


def test_train_prefix_bench_reports_every_config(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert train_prefix.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["configs"]) == set(train_prefix.CONFIGS)
    for name, config in report["configs"].items():
        assert config["steps"] == 6 and config["batch_size"] == train_prefix.CONFIGS[name][1]
    # the MLP's size, counted by hand for the tiny pipeline's 128-d CLIP and 64-d GPT-2
    # (ClipCap's MLP: 128 -> 64 * 10 / 2 -> 64 * 10, with biases)
    params = {name: c["mapper_params_m"] for name, c in report["configs"].items()}
    assert params["mlp b40"] == pytest.approx((128 * 320 + 320 + 320 * 640 + 640) / 1e6)
    assert params["transformer b40"] == params["transformer b256"]
    # the COCO estimate is the measured rates scaled to COCO's 113,287 images, 566,747 captions
    estimate = report["coco_estimate"]
    hours = 113_287 / report["features_images_per_s"] / 3600
    assert estimate["feature_pass_hours"] == pytest.approx(hours)
    for name, config in report["configs"].items():
        expected = 10 * 566_747 / config["samples_per_s"] / 3600
        assert estimate[f"10_epochs_hours {name}"] == pytest.approx(expected)
    assert "transformer b40" in capsys.readouterr().out
