"""Training jobs a server runs for its visitors: one at a time, each in a process of its own.

A job is a `vlm.training` run (`train(config, Progress(...))`, the call the CLI makes) started
from the page (the Train tab) or its API: its data is a zip of captioned images, checked by
the same gate as any upload (`vlm.uploads.extract_training_zip`), or a ShapeWorld set of a
chosen size; its base is the bundled encoder (with the bundled LM, or a small LM learned on
the captions first, as README's quick start) or a model trained earlier, whose LM stays
frozen; its limits (images, steps, wall time) are checked before any work. Jobs wait in a
queue, run one at a time in a child process (lowered priority, its own torch threads, so the
server keeps serving; started ahead, torch imported, so a job's first step comes in seconds,
and a fresh one for each job), report through an events file the child writes, and stop on
request (the stage's checkpoint saved). Each job belongs to the session that started it; its folder
and model are deleted `Limits.train_max_age` seconds after it ends.

On ZeroGPU (Hugging Face Spaces) no process of ours may hold the GPU: a job runs instead
through `spaces.GPU(duration=…)` (`TrainingJobs(gpu=spaces.GPU)`), which forks a worker with
a GPU lent for the job's `gpu_seconds`, in the context of the request that started it (so the
visitor's quota pays for it, not the Space's); its events and stop file work as a child's.
"""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..data import FileDataset
from ..errors import InputError
from ..inputs import number
from ..limits import Limits, current
from ..paths import ASSETS
from ..uploads import UploadError, extract_training_zip

log = logging.getLogger("vlm.training_jobs")

SAMPLE_EVERY = 25  # steps between the held-out captions a job shows
BUNDLE = ASSETS / "shapeworld"
# the bases a job can start from (a model trained earlier here is one too, by its name)
BASES = {
    "shapeworld encoder + an LM learned on your captions": "learn-lm",
    "shapeworld encoder and LM (as bundled)": "bundle",
}
MAPPERS = {
    "the recipe's (as vlm train's)": None,
    "MLP (ClipCap's)": dict(kind="mlp", prefix_length=10),
    "Transformer, 2 layers": dict(
        kind="transformer", prefix_length=10, clip_length=10, num_layers=2
    ),  # fmt: skip
}
STATES = ("queued", "running", "done", "stopped", "failed")
# What a job holds a ZeroGPU GPU for: start-up (loading the parts, encoding the images once)
# and each step, an estimate with room (no GPU here to measure one): ZeroGPU charges the
# seconds used, the duration is the most it lends, and a job past it is aborted.
GPU_START_SECONDS = 90
GPU_SECONDS_PER_STEP = 0.25


def gpu_seconds(config: dict, most: float) -> int:
    """How long a job's ZeroGPU call asks for: start-up and its steps (the LM stage's and the
    prefix stage's), at most `most` (the server's wall limit for a job)."""
    steps = int(config.get("lm_steps") or 0) + int(config.get("prefix_steps") or 0)
    return int(min(most, GPU_START_SECONDS + GPU_SECONDS_PER_STEP * steps))


class JobError(InputError):
    """A job the server will not start, or one a session may not see; the message says why."""


@dataclasses.dataclass
class Job:
    """One training run: who asked, where it lives, and what it has reported so far."""

    id: str
    name: str
    session: str | None
    folder: Path
    config: dict  # vlm.training.TrainConfig's fields (as JSON)
    images: int  # training images (data) or scenes (ShapeWorld)
    state: str = "queued"
    error: str = ""
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    events: list[dict] = dataclasses.field(default_factory=list)
    # what runs it: a child process, or (ZeroGPU) a thread waiting on the GPU call
    process: multiprocessing.Process | threading.Thread | None = None
    # the request that started it (ZeroGPU reads the visitor from it)
    context: contextvars.Context = dataclasses.field(default_factory=contextvars.copy_context)
    _offset: int = 0  # how far the events file has been read

    @property
    def model_name(self) -> str:
        """The name every task's model argument takes for this job's model."""
        return f"{self.name} (job {self.id})"

    @property
    def model_folder(self) -> Path:
        return self.folder / "run" / "pipeline"


def _slug(text: str) -> str:
    kept = "".join(c if c.isalnum() or c in "-_" else "-" for c in (text or "").strip())
    return kept.strip("-")[:40] or "my-model"


class TrainingJobs:
    """The server's training jobs (see the module): `start`, `status`, `stop`, the models of
    finished jobs (`models`: name -> folder), deleted `limits.train_max_age` seconds after
    they end; every request checked against `limits` (the `train_*` ones). `gpu`: ZeroGPU's
    `spaces.GPU`, to run jobs through it (see the module) instead of in a child process."""

    def __init__(self, root: Path, limits: Limits | None = None,
                 gpu: Callable | None = None):  # fmt: skip
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or current()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.on_forget = lambda folder: None  # told of a deleted job's model folder
        self._context = multiprocessing.get_context("spawn")  # no torch state shared with us
        self._on_gpu = None
        if gpu is not None:
            seconds = self.limits.train_max_seconds
            self._on_gpu = gpu(duration=lambda config, *_: gpu_seconds(config, seconds))(
                run_job_here
            )
        self._spare = self._new_process() if self._on_gpu is None else None
        atexit.register(self.close)  # before multiprocessing waits for its children at exit
        self._worker = threading.Thread(target=self._run_queue, daemon=True, name="vlm-train")
        self._worker.start()

    def close(self) -> None:
        """Stop the running job (its checkpoint saved) and the spare child."""
        for job in list(self._jobs.values()):
            if job.state == "running":
                (job.folder / "stop").touch()
        if self._spare is None:
            return
        process, connection = self._spare
        connection.close()  # the spare's wait for a job ends
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()

    def _new_process(self):
        """A child that imports what training needs, then waits for one job."""
        ours, theirs = self._context.Pipe()
        # not a daemon: a job's feature cache decodes images in worker processes of its own
        process = self._context.Process(target=_serve_one_job, args=(theirs,))
        process.start()
        theirs.close()
        return process, ours

    # ------------------------------------------------------------------ requests

    def start(self, files, base: str, steps, name: str, session: str | None,
              mapper: str = "the recipe's (as vlm train's)", shapeworld_images=None,
              models: dict[str, Path] | None = None) -> Job:  # fmt: skip
        """Check a request and queue its job (JobError or UploadError, before any work, for
        a bad one). `files`: a zip (a list holding one); else `shapeworld_images` scenes are
        generated. `models`: the models trained earlier that may serve as a base."""
        steps = int(number(steps, "Steps", 10, self.limits.train_max_steps))
        if mapper not in MAPPERS:
            raise JobError(f"Choose a mapper: {', '.join(MAPPERS)}.")
        with self._lock:
            most = self.limits.train_max_queued
            if sum(j.state == "queued" for j in self._jobs.values()) >= most:
                raise JobError(f"{most} training jobs are waiting already; try later.")
        job_id = uuid.uuid4().hex[:10]
        folder = self.root / job_id
        folder.mkdir(parents=True)
        try:
            config, count = self._config(files, base, steps, mapper, shapeworld_images, folder,
                                         models or {})  # fmt: skip
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = Job(job_id, _slug(name), session, folder, config, count)
        with self._lock:
            self._jobs[job_id] = job
            self._queue.append(job_id)
        self._wake.set()
        log.info("training job %s queued (%d images, %d steps)", job_id, count, steps)
        return job

    def _config(self, files, base, steps, mapper, shapeworld_images, folder: Path, models):
        """The run's TrainConfig fields, and how many images it trains on."""
        config: dict = dict(out=str(folder / "run"), prefix_steps=steps, seed=0,
                            mapper=MAPPERS[mapper], checkpoint_every=max(50, steps // 4),
                            evaluate=True)  # fmt: skip
        if files:
            files = files if isinstance(files, list | tuple) else [files]
            if len(files) != 1 or not str(files[0]).lower().endswith(".zip"):
                raise JobError("Upload one .zip of images with their captions.")
            most = self.limits.train_max_images
            data, _ = extract_training_zip(files[0], folder / "data", max_files=2 * most + 2,
                                           max_total_bytes=self.limits.train_max_zip)  # fmt: skip
            count = _count_captioned(data, most)
            config.update(data=[str(data)], val_fraction=0.1, prefix_batch_size=32,
                          val_every=25, early_stopping=0)  # fmt: skip
        else:
            count = int(number(shapeworld_images, "ShapeWorld images", 100, 20_000))
            config.update(dataset="shapeworld", prefix_examples=count, prefix_batch_size=32)
        if base in models:  # a model trained earlier here: its encoder and its frozen LM
            model = Path(models[base])
            config.update(encoder=f"local-dir:{model / 'encoder'}", lm=str(model / "lm"))
        elif BASES.get(base) == "bundle" or (BASES.get(base) and not files):
            config.update(encoder=f"local-dir:{BUNDLE / 'encoder'}", lm=str(BUNDLE / "lm"))
        elif BASES.get(base) == "learn-lm":  # README's quick start: the LM first, then frozen
            config.update(encoder=f"local-dir:{BUNDLE / 'encoder'}", lm_steps=1000,
                          lm_batch_size=16, early_stopping=4)  # fmt: skip
        else:
            raise JobError(f"No base named {base!r}: choose one of {', '.join(BASES)} or a "
                           "model you trained here.")  # fmt: skip
        return config, count

    def _get(self, job_id: str, session: str | None) -> Job:
        with self._lock:
            job = self._jobs.get(str(job_id or ""))
        if job is None or (job.session is not None and job.session != session):
            raise JobError(f"No training job {job_id!r} here (jobs are seen by their session).")
        return job

    def status(self, job_id: str, session: str | None) -> dict:
        """The job as the page and the API show it (see `Job`): state, place in the queue,
        step and steps of its stage, losses, samples, elapsed and ETA, its model's name."""
        job = self._get(job_id, session)
        with self._lock:
            self._read_events(job)
            place = list(self._queue).index(job.id) + 1 if job.id in self._queue else None
            events = list(job.events)
        steps = [e for e in events if e["kind"] == "step"]
        stage = next((e for e in reversed(events) if e["kind"] == "stage"), None)
        last = steps[-1] if steps else None
        samples = next((e["samples"] for e in reversed(events) if e["kind"] == "samples"), {})
        done = next((e for e in events if e["kind"] == "done"), None)
        elapsed = (job.ended or time.time()) - job.started if job.started else 0.0
        eta = None
        if job.state == "running" and last and stage and last["step"] > stage["step"]:
            rate = (last["seconds"] - stage["seconds"]) / (last["step"] - stage["step"])
            eta = rate * (last["steps"] - last["step"])
        return {
            "job": job.id, "name": job.name, "state": job.state, "place": place,
            "stage": (last or stage or {}).get("stage", ""),
            "step": last["step"] if last else 0,
            "steps": (last or stage or {}).get("steps", job.config.get("prefix_steps", 0)),
            "loss": last["loss"] if last else None,
            "val_loss": next((e["val_loss"] for e in reversed(events)
                              if e["kind"] == "validation"), None),  # fmt: skip
            "losses": [(e["stage"], e["step"], e["loss"]) for e in steps],
            "val_losses": [(e["stage"], e["step"], e["val_loss"]) for e in events
                           if e["kind"] == "validation"],  # fmt: skip
            "samples": samples,
            "scores": (done or {}).get("scores") or {},
            "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
            "images": job.images,
            "model": job.model_name if job.state == "done" else None,
            "error": job.error,
        }  # fmt: skip

    def stop(self, job_id: str, session: str | None) -> dict:
        """Stop a job: a queued one is dropped, a running one saves its checkpoint and ends."""
        job = self._get(job_id, session)
        with self._lock:
            if job.id in self._queue:
                self._queue.remove(job.id)
                job.state, job.ended = "stopped", time.time()
        (job.folder / "stop").touch()
        return self.status(job_id, session)

    def models(self, session: str | None = None) -> dict[str, Path]:
        """The models of finished jobs (every session's with `session` None): name -> folder."""
        with self._lock:
            done = [j for j in self._jobs.values() if j.state == "done"]
        return {j.model_name: j.model_folder for j in done
                if session is None or j.session in (None, session)}  # fmt: skip

    def finished(self, job_id: str, session: str | None) -> Job:
        """A job of this session that has its model (JobError otherwise)."""
        job = self._get(job_id, session)
        if job.state != "done":
            raise JobError(f"Job {job.id} has no model ({job.state}).")
        return job

    def model_zip(self, job_id: str, session: str | None) -> Path:
        """The finished job's model folder as a zip (`<name>/config.json`, …): unpacked,
        `Pipeline.from_pretrained` loads the folder."""
        job = self.finished(job_id, session)
        archive = job.folder / f"{job.name}.zip"
        if not archive.is_file():
            partial = archive.with_suffix(".partial")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
                for path in sorted(job.model_folder.rglob("*")):
                    if path.is_file():
                        out.write(path, f"{job.name}/{path.relative_to(job.model_folder)}")
            partial.rename(archive)
        return archive

    def jobs_of(self, session: str | None) -> list[str]:
        with self._lock:
            return [j.id for j in self._jobs.values() if j.session == session]

    # ------------------------------------------------------------------ the worker

    def _run_queue(self) -> None:
        while True:
            self._wake.wait(timeout=5)
            self._wake.clear()
            self._forget_old()
            while True:
                with self._lock:
                    if not self._queue:
                        break
                    job = self._jobs[self._queue.popleft()]
                    job.state, job.started = "running", time.time()
                self._run(job)

    def _run(self, job: Job) -> None:
        connection = None
        if self._on_gpu is None:
            job.process, connection = self._spare
            message = (job.config, str(job.folder), self.limits.train_threads)
            try:
                connection.send(message)
            except OSError:  # the spare died: a new one, now
                job.process, connection = self._new_process()
                connection.send(message)
        else:
            job.process = threading.Thread(target=self._run_on_gpu, args=(job,), daemon=True,
                                           name=f"vlm-train-{job.id}")  # fmt: skip
            job.process.start()
        seconds = self.limits.train_max_seconds
        deadline = time.time() + seconds
        while job.process.is_alive():
            job.process.join(timeout=1)
            if time.time() > deadline and not (job.folder / "stop").exists():
                (job.folder / "stop").touch()  # over its time: stopped as if asked
                job.error = f"stopped after the server's limit of {seconds:.0f} s"
            child = isinstance(job.process, multiprocessing.process.BaseProcess)
            if child and (job.folder / "stop").exists() and time.time() > deadline + 120:
                job.process.kill()  # it did not stop: not even a checkpoint
        with self._lock:
            self._read_events(job)
            kinds = {e["kind"] for e in job.events}
            failure = next((e for e in job.events if e["kind"] == "failed"), None)
            if "done" in kinds and job.model_folder.is_dir():
                job.state = "done"
            elif "stopped" in kinds or (job.folder / "stop").exists():
                job.state = "stopped"
            else:
                job.state = "failed"
                exit_code = getattr(job.process, "exitcode", None)
                job.error = ((failure or {}).get("error") or job.error
                             or f"exit code {exit_code}")  # fmt: skip
            job.ended = time.time()
        if connection is not None:
            connection.close()
            self._spare = self._new_process()  # fresh for the next job: nothing left of it
        log.info("training job %s %s", job.id, job.state)

    def _run_on_gpu(self, job: Job) -> None:
        """The ZeroGPU call, in the context of the request that started the job; what it
        raises (a quota, a duration ZeroGPU will not lend) is the job's error."""
        try:
            job.context.run(self._on_gpu, job.config, str(job.folder))
        except Exception as error:  # noqa: BLE001 (shown to the job's owner)
            job.error = str(error) or type(error).__name__
            log.warning("training job %s on the GPU: %s", job.id, job.error)

    def _read_events(self, job: Job) -> None:
        path = job.folder / "events.jsonl"
        if not path.is_file():
            return
        with path.open() as handle:
            handle.seek(job._offset)
            for line in handle:
                if not line.endswith("\n"):
                    break  # the child is writing it
                job._offset += len(line.encode())
                job.events.append(json.loads(line))

    def _forget_old(self) -> None:
        cutoff = time.time() - self.limits.train_max_age
        with self._lock:
            old = [j for j in self._jobs.values() if j.ended and j.ended < cutoff]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            self.on_forget(job.model_folder)
            shutil.rmtree(job.folder, ignore_errors=True)


def _count_captioned(data: Path, most: int) -> int:
    """How many images of extracted training data have a caption (JobError: none, or more
    than `most`), read as `vlm train --data` reads them."""
    dataset = FileDataset([str(data)], val_fraction=0.0)
    count = sum(1 for example in dataset.examples() if example.captions)
    if not count:
        raise UploadError(
            "No image in the zip has a caption: put a .txt beside each image "
            "(a caption a line) or a captions.csv (image_path, caption)."
        )
    if count > most:
        raise JobError(f"{count} captioned images; the limit is {most}.")
    if count < 10:
        raise JobError(f"{count} captioned images are too few to learn from; give at least 10.")
    return count


def _serve_one_job(connection) -> None:
    """A spare child: torch and the trainer imported ahead, then the one job it is sent."""
    import vlm.training.run  # noqa: F401  (the imports: most of a job's start-up)

    try:
        config, folder, threads = connection.recv()
    except EOFError:  # the server went away
        return
    run_job(config, folder, threads)


def run_job_here(config: dict, folder: str) -> None:
    """A job in the calling process (ZeroGPU's worker): `run_job` at its priority and
    threads."""
    run_job(config, folder, threads=None)


def run_job(config: dict, folder: str, threads: int | None = 1) -> None:
    """The child process: train as `vlm train` does on `threads` CPU threads (at a lowered
    priority; None: as the process is), its events appended to `<folder>/events.jsonl`,
    stopping when `<folder>/stop` appears."""
    import torch

    from . import Progress, TrainConfig, train

    if threads is not None:
        os.nice(10)
        torch.set_num_threads(threads)
    folder = Path(folder)
    stop = threading.Event()
    parent = os.getppid()

    def watch() -> None:  # asked to stop, or the server is gone
        while not stop.is_set():
            if (folder / "stop").exists() or os.getppid() != parent:
                stop.set()
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    events = (folder / "events.jsonl").open("a", encoding="utf-8")

    def write(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    fields = {k: (tuple(v) if k in ("data", "stages") else v) for k, v in config.items()}
    fields["out"] = Path(fields["out"])
    try:
        train(TrainConfig(**fields), Progress(lambda e: write(dataclasses.asdict(e)), stop,
                                              sample_every=SAMPLE_EVERY))  # fmt: skip
    except Exception as error:  # noqa: BLE001 (the job's failure, shown to its owner)
        write({"kind": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
    finally:
        stop.set()
        events.close()
