"""The load test (bench/load.py) with small numbers: the demo, served on loopback, answers
concurrent gradio_client sessions of mixed requests without an error or a mixed-up answer,
and its memory does not grow from one round to the next. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from bench import load


@pytest.fixture(scope="module")
def report():
    # 4 sessions x 3 requests x 2 rounds, on one torch thread: about half a minute on 2 cores
    return load.run_load(
        sessions=4, requests=3, rounds=2, tolerance_mb=64, env={"OMP_NUM_THREADS": "1"}
    )


def test_no_errors_under_concurrent_sessions(report):
    assert report["server_alive"]
    assert report["warmup_errors"] == 0, report["error_samples"]
    assert report["errors"] == 0, (report["error_samples"], report.get("server_log_tail"))
    assert report["requests"] == 4 * 3 * 2


def test_every_kind_is_exercised_and_answers_stay_the_same(report):
    assert set(report["latency"]) == {*load.KINDS, "overall"}
    assert report["latency"]["overall"]["n"] == report["requests"]
    assert report["inconsistent"] == 0, report["inconsistent_samples"]


def test_memory_does_not_grow_across_rounds(report):
    after = [r["rss_mb_after"] for r in report["rounds"]]
    assert len(after) == 2 and all(mb > 0 for mb in after)
    assert report["peak_rss_mb"] >= max(after)
    assert report["rss_growth_ok"], after
    assert report["ok"]


def test_the_report_is_json_with_a_row_per_kind(report):
    latency = json.loads(json.dumps(report))["latency"]
    # session s (0-3) sends kinds s, s+1, s+2 in turn, in each of 2 rounds: counted by hand
    sent = {"caption": 2, "classify": 4, "answer": 6, "search": 6, "few_shot": 4, "explain": 2}
    assert {kind: latency[kind]["n"] for kind in load.KINDS} == sent


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 50) == 50
    assert load.percentile(values, 95) == 95
    assert load.percentile([3.0], 95) == 3.0


def test_cli_refuses_nonsense_sizes():
    with pytest.raises(SystemExit):
        load.main(["--sessions", "0"])
