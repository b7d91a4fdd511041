"""`python -m bench.train_prefix` on toy sizes: the real trainer runs each mapper from the
feature cache and the report holds rates and the COCO estimate. Nothing asserts on speed."""

from __future__ import annotations

import json

from bench import train_prefix


def test_train_prefix_bench_reports_every_config(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert train_prefix.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["configs"]) == set(train_prefix.CONFIGS)
    for config in report["configs"].values():
        assert config["steps"] == 6 and config["samples_per_s"] > 0
        assert config["batch_size"] in (24, 40, 256) and config["mapper_params_m"] > 0
    assert report["features_images_per_s"] > 0
    estimate = report["coco_estimate"]
    assert estimate["feature_pass_hours"] > 0 and len(estimate) == 1 + len(train_prefix.CONFIGS)
    assert "transformer b40" in capsys.readouterr().out
