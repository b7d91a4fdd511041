"""Training jobs on ZeroGPU (issue 42): no process of ours may hold the GPU there, so a job
runs through `spaces.GPU(duration=…)`, sized from its steps, in the context of the request
that started it. ZeroGPU itself needs Hugging Face's device service; here the real `spaces`
package runs as it does off ZeroGPU (its decorator gives the function back), and a recording
decorator stands in for the service's side (what it is asked for, in which context)."""

from __future__ import annotations

import contextvars
import random
import time

import pytest

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.limits import Limits
from vlm.training.jobs import (
    BASES,
    GPU_SECONDS_PER_STEP,
    GPU_START_SECONDS,
    TrainingJobs,
    gpu_seconds,
    run_job_here,
)

BUNDLED = next(name for name, base in BASES.items() if base == "bundle")
VISITOR = contextvars.ContextVar("visitor", default=None)  # stands in for Gradio's request


def finished(jobs: TrainingJobs, job_id: str, session: str, limit: float = 240) -> dict:
    deadline = time.time() + limit
    while time.time() < deadline:
        status = jobs.status(job_id, session)
        if status["state"] in ("done", "stopped", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status['state']} after {limit} s")


def test_the_duration_asked_grows_with_the_steps_and_stays_within_the_limit():
    alone = gpu_seconds({"prefix_steps": 400}, 3600)
    assert alone == GPU_START_SECONDS + 400 * GPU_SECONDS_PER_STEP
    with_lm = gpu_seconds({"prefix_steps": 400, "lm_steps": 1000}, 3600)
    assert with_lm == GPU_START_SECONDS + 1400 * GPU_SECONDS_PER_STEP
    assert gpu_seconds({"prefix_steps": 10**6}, 900) == 900


def test_a_job_runs_through_the_gpu_decorator_in_the_request_that_started_it(tmp_path):
    """What ZeroGPU's decorator is handed: the job's function and a duration callable that,
    given the job's arguments, sizes the job; the call is made in the starting request's
    context (ZeroGPU reads the visitor's quota from it), not the worker thread's own, and no
    child process is started."""
    asked = {}

    def fake_gpu(duration):
        def decorate(task):
            asked["task"] = task

            def call(*args):
                asked["seconds"] = duration(*args)
                asked["visitor"] = VISITOR.get()
                return task(*args)

            return call

        return decorate

    jobs = TrainingJobs(tmp_path / "jobs", Limits(train_max_seconds=600), gpu=fake_gpu)
    try:
        assert jobs._spare is None  # no child waits for a job
        token = VISITOR.set("visitor-1")
        try:
            job = jobs.start(None, BUNDLED, 10, "zero", "s1", shapeworld_images=100)
        finally:
            VISITOR.reset(token)
        status = finished(jobs, job.id, "s1")
        assert status["state"] == "done", status
        assert asked["task"] is run_job_here and asked["visitor"] == "visitor-1"
        assert asked["seconds"] == gpu_seconds(job.config, 600)
        scene = sw.render(sw.sample_scene(random.Random(0)))
        [caption] = Pipeline.from_pretrained(job.model_folder, device="cpu").caption([scene])
        assert caption.strip()
    finally:
        jobs.close()


def test_what_zero_gpu_refuses_is_the_jobs_error(tmp_path):
    """A refusal (over the visitor's quota, a duration ZeroGPU will not lend) fails the job
    with ZeroGPU's own message, and the next job still runs."""

    def refusing_gpu(duration):
        def decorate(task):
            def call(*args):
                raise RuntimeError("You have exceeded your free ZeroGPU quota (190s requested)")

            return call

        return decorate

    jobs = TrainingJobs(tmp_path / "jobs", gpu=refusing_gpu)
    try:
        first = jobs.start(None, BUNDLED, 10, "a", "s1", shapeworld_images=100)
        second = jobs.start(None, BUNDLED, 10, "b", "s1", shapeworld_images=100)
        for job in (first, second):
            status = finished(jobs, job.id, "s1")
            assert status["state"] == "failed"
            assert "exceeded your free ZeroGPU quota" in status["error"]
    finally:
        jobs.close()


def test_off_zero_gpu_the_real_decorator_runs_the_job_here(tmp_path):
    """The `spaces` package as installed on a Space, off ZeroGPU: its decorator gives the
    function back, so a job given `gpu=spaces.GPU` trains in this process and stops on
    request like a child (its checkpoint saved)."""
    spaces = pytest.importorskip("spaces")
    jobs = TrainingJobs(tmp_path / "jobs", gpu=spaces.GPU)
    try:
        job = jobs.start(None, BUNDLED, 2000, "long", "s1", shapeworld_images=100)
        deadline = time.time() + 120
        while jobs.status(job.id, "s1")["step"] < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert jobs.status(job.id, "s1")["state"] == "running"
        jobs.stop(job.id, "s1")
        status = finished(jobs, job.id, "s1")
        assert status["state"] == "stopped" and 3 <= status["step"] < 2000
        assert any((job.folder / "run" / "checkpoints").rglob("*")), "no checkpoint saved"
    finally:
        jobs.close()


def test_the_app_hands_spaces_gpu_to_its_jobs_on_zero_gpu_only(monkeypatch):
    spaces = pytest.importorskip("spaces")
    import app

    monkeypatch.setattr(spaces.config.Config, "zero_gpu", False)
    assert app.zero_gpu() is None
    monkeypatch.setattr(spaces.config.Config, "zero_gpu", True)
    assert app.zero_gpu() is spaces.GPU
