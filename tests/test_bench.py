"""The benchmark harness (`python -m bench`) on toy sizes: it runs, it writes ratios, and our
greedy captions are token-for-token ClipCap's. Nothing here asserts on speed."""

from __future__ import annotations

import json
import math

import pytest

from bench import __main__ as bench_main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench_main.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_benchmark_reports_ratios(report):
    assert set(report["results"]) == set(bench_main.BENCHMARKS)
    for name, result in report["results"].items():
        assert "error" not in result, (name, result.get("error"))
        ratios = [m["ratio"] for m in result["metrics"] if m["ratio"] is not None]
        assert ratios, name
        assert all(math.isfinite(r) and r > 0 for r in ratios), (name, ratios)


def test_machine_info_is_recorded(report):
    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "torch", "device", "date"):
        assert machine[key], key
    assert machine["device"] == "cpu"


def test_greedy_tokens_match_clipcap_reference(report):
    caption = report["results"]["caption"]
    identical = next(m for m in caption["metrics"] if m["name"] == "greedy tokens identical")
    assert identical["ours"] is True and identical["met"] is True
    details = caption["details"]
    assert details["reference_greedy_tokens"] > 0
    assert details["greedy_mismatched_images"] == []


def test_only_and_unknown_names(tmp_path, capsys):
    out = tmp_path / "search.json"
    argv = ["--tiny", "--device", "cpu", "--only", "search", "--out", str(out)]
    assert bench_main.main(argv) == 0
    assert list(json.loads(out.read_text())["results"]) == ["search"]
    assert "search" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_main.main(["--only", "nope"])
