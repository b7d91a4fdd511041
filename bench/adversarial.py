"""Adversarial probes against the served demo (`python -m bench.load --adversarial`).

Each probe is one thing an attacker (or a careless script) does to a public server, bounded
in count and time; for each, the server's peak RSS over its idle RSS, its RSS once settled,
whether it still serves (a plain caption afterwards), figures of its own, and its targets:

- huge-body: 4 POSTs of a 200 MB JSON body to /gradio_api/call/classify, two declaring their
  length and two chunked (no Content-Length). Each must get HTTP 413 (VLM_MAX_BODY_SIZE), and
  the RSS a few seconds later must be within 100 MB of idle.
- caption-all-8000: one upload of a compressible 8000x8000 PNG, named 8 times in one
  /caption_files call with beam search 8. Peak at most +1024 MB.
- explain-64mp: /explain on an 8000x8000 (64 MP) upload with a phrase. Peak at most +1024 MB.
- flood: one client (a fixed session hash) sends 70 /classify calls of 2,000 labels x 10
  templates at once; at most VLM_MAX_PENDING (4) may be admitted, every other one refused
  with its message. Meanwhile a second client (a gradio_client session) captions a bundled
  ShapeWorld scene 10 times in turn: its p95 at most 5 s and no errors. The flood is then
  drained (its stream read to the end, or closed, which cancels what is left).
- upload-age: on a second server with VLM_TEMP_MAX_AGE=5, 3 uploads of 49 MiB and one
  /caption_files (its CSV); after the age and two sweeps none of them may be left on disk.

Huge-body runs first, right after the idle RSS is measured, so that its settled RSS is
compared with an idle server, not with what the image probes left in the allocator. All
requests go to 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

from vlm.examples import shapeworld_examples

from .load import FILE_DATA, MB, PeakSampler, Server, _data_url, _png, _upload, machine, percentile

MODEL = "shapeworld"
GREEDY = ["greedy", 3, 0.9, 1.0, 30, MODEL]
BEAM_8 = ["beam search", 8, 0.9, 1.0, 30, MODEL]
JSON = {"Content-Type": "application/json"}
SETTLE_S = 3.0  # the wait after a probe before its RSS is read
MAX_PENDING = 4  # the server's VLM_MAX_PENDING (its default; the bench does not change it)
REFUSALS = ("requests waiting or running", "The server is busy with")  # FairQueue's messages

# the targets
PEAK_LIMIT_MB = 1024.0
SETTLED_LIMIT_MB = 100.0
P95_LIMIT_S = 5.0

# sizes
BIG_SIDE = 8000
HUGE_BODY_BYTES = 200 * MB
HUGE_BODY_POSTS = 4
FLOOD_CALLS = 70
FLOOD_SESSION = "adversarial-flood"
FLOOD_DRAIN_S = 300.0  # the most the flood's admitted calls may take, all together
POLITE_CAPTIONS = 10
UPLOAD_AGE_S = 5
UPLOAD_BYTES = 49 * MB  # just under the default VLM_MAX_FILE_SIZE (50mb, 1024-based)
UPLOAD_FILES = 3


# ---------------------------------------------------------------------------- measuring


def reset_high_water_mark(server: Server) -> bool:
    """Reset the kernel's peak RSS of the server process to its RSS now (Linux 4.0+: "5" to
    /proc/PID/clear_refs), so that VmHWM afterwards is this probe's peak; False if refused."""
    try:
        Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Watch:
    """The server's RSS during one probe: `peak` (sampled every 0.1 s, and the kernel's high
    water mark, reset when the probe starts) and `seconds`, set when the block ends."""

    def __init__(self, server: Server):
        self.server, self.peak, self.seconds = server, 0, 0.0

    def __enter__(self) -> Watch:
        self._kernel = reset_high_water_mark(self.server)
        self._sampler = PeakSampler(self.server, interval=0.1)
        self._sampler.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *_) -> None:
        self.seconds = time.perf_counter() - self._started
        self.peak = self._sampler.stop()
        if self._kernel:
            self.peak = max(self.peak, self.server.high_water_mark() or 0)


def settled_rss(server: Server, wait: float = SETTLE_S) -> int:
    """The server's RSS after `wait` seconds of rest."""
    time.sleep(wait)
    return server.rss()


# ---------------------------------------------------------------------------- calls


@dataclass
class Answer:
    """What a raw API call got: the HTTP status of its POST, its last event ("complete",
    "error"; "http-error" when the POST was refused, "timeout" when it ran out of time) and
    that event's data, its seconds, and every (event, data) its stream carried."""

    status: int
    event: str
    data: str
    seconds: float
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def message(self) -> str:
        """The refusal's or error's text (Gradio's "detail" or "error"), else the data."""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            parsed = json.loads(self.data)
            if isinstance(parsed, dict):
                return str(parsed.get("detail") or parsed.get("error") or parsed)
        return self.data


def read_events(base: str, endpoint: str, event_id: str, deadline: float) -> tuple[list, bool]:
    """The (event, data) pairs of an event stream of the raw API, read until it ends or
    `deadline` (time.monotonic) passes; (pairs, whether it timed out). Closing the stream
    early makes Gradio cancel what its session has left in the queue."""
    pairs, event = [], None
    url = f"{base}/gradio_api/call/{endpoint}/{event_id}"
    try:
        with httpx.stream("GET", url, timeout=30) as stream:  # heartbeats come every 15 s
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event in ("complete", "error"):
                    pairs.append((event, line[len("data: ") :]))
                if time.monotonic() > deadline:
                    return pairs, True
    except httpx.TimeoutException:
        return pairs, True
    return pairs, False


def call(
    url: str, endpoint: str, data: list, timeout: float = 120.0, session_hash: str | None = None
) -> Answer:
    """One call through the raw HTTP API (POST, then its event stream), as `load.raw_call`,
    but bounded in total time by `timeout` and with an optional session of its own."""
    base, started = url.rstrip("/"), time.monotonic()
    body = {"data": data, **({"session_hash": session_hash} if session_hash else {})}
    response = httpx.post(f"{base}/gradio_api/call/{endpoint}", content=json.dumps(body),
                          headers=JSON, timeout=60)  # fmt: skip
    if response.status_code != 200:
        seconds = time.monotonic() - started
        return Answer(response.status_code, "http-error", response.text[:500], seconds)
    event_id = response.json()["event_id"]
    pairs, timed_out = read_events(base, endpoint, event_id, started + timeout)
    event, text = ("timeout", "") if timed_out or not pairs else pairs[-1]
    return Answer(200, event, text, time.monotonic() - started, pairs)


def scene() -> Path:
    """The first bundled ShapeWorld example."""
    return shapeworld_examples()[0][0]


def scene_image() -> dict:
    """The bundled scene as an inline FileData (a data URL)."""
    return {"url": _data_url(scene().read_bytes()), "meta": FILE_DATA}


def serves(url: str) -> tuple[bool, str]:
    """Whether a plain caption of the bundled scene succeeds now: (ok, the caption or why)."""
    try:
        answer = call(url, "caption", [scene_image(), *GREEDY], timeout=90)
    except httpx.HTTPError as error:
        return False, f"{type(error).__name__}: {error}"
    text = answer.message if answer.event == "complete" else f"{answer.event}: {answer.message}"
    return answer.event == "complete" and bool(text.strip(" []\"'")), text[:120]


def big_png(side: int = BIG_SIDE) -> bytes:
    """A side x side RGB PNG that compresses well (a few MB): one colour, a red disc, and one
    pixel in 500 of random colour, so the encoder cannot treat it as flat."""
    rng = np.random.default_rng(0)
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[:] = (70, 130, 180)
    n = side * side // 500
    pixels[rng.integers(0, side, n), rng.integers(0, side, n)] = rng.integers(0, 256, (n, 3))
    image = Image.fromarray(pixels)
    del pixels
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, side // 2, side // 2), (220, 40, 40))
    return _png(image)


# ---------------------------------------------------------------------------- probes


@dataclass
class Result:
    """One probe's row: RSS in MB over the server's idle RSS (its peak during the probe, and
    once settled afterwards), whether the server still served, figures and targets (each
    target's name: met or not)."""

    probe: str
    idle_mb: float
    peak_over_idle_mb: float
    settled_over_idle_mb: float
    seconds: float
    serving: bool
    serving_answer: str
    figures: dict
    targets: dict[str, bool]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.serving and self.error is None and all(self.targets.values())


Probe = Callable[[Server, float], tuple[dict, dict[str, bool]]]


def run_probe(name: str, probe: Probe, server: Server, idle: int, log=print) -> Result:
    """Run `probe(server, idle MB)` (its figures and targets) under a Watch, then check that
    the server still serves and read its settled RSS. A probe that raises fails."""
    log(f"{name}: running")
    figures, targets, error = {}, {}, None
    with Watch(server) as watch:
        try:
            figures, targets = probe(server, idle / MB)
        except Exception as exc:  # the probe's own failure is the result, not a crash
            error = f"{type(exc).__name__}: {exc}"[:300]
    settled = settled_rss(server)
    alive = server.process.poll() is None
    serving, answer = serves(server.url) if alive else (False, "the server exited")
    result = Result(
        name, round(idle / MB, 1), round((watch.peak - idle) / MB, 1),
        round((settled - idle) / MB, 1), round(watch.seconds, 1), serving, answer, figures,
        targets, error,
    )  # fmt: skip
    log(
        f"{name}: peak +{result.peak_over_idle_mb:.0f} MB, settled "
        f"{result.settled_over_idle_mb:+.0f} MB, {result.seconds:.1f} s, serving {serving}, "
        f"{'ok' if result.ok else 'FAILED'}" + (f" ({error})" if error else "")
    )
    return result


def huge_body(server: Server, idle_mb: float) -> tuple[dict, dict[str, bool]]:
    """4 POSTs of a 200 MB JSON body (a classify whose image is a 200 MB data URL),
    alternately declaring their length and chunked; each must get 413."""
    head = b'{"data": [{"url": "data:image/png;base64,'
    tail = b'", "meta": {"_type": "gradio.FileData"}}, "a, b", "", "shapeworld"]}'
    body = head + b"A" * (HUGE_BODY_BYTES - len(head) - len(tail)) + tail
    posts = []
    for number in range(HUGE_BODY_POSTS):
        declared = number % 2 == 0
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            for start in range(0, len(body), MB):
                sent += min(MB, len(body) - start)
                yield body[start : start + MB]

        headers = dict(JSON)
        if declared:  # with Content-Length httpx does not chunk an iterator
            headers["Content-Length"] = str(len(body))
        started = time.perf_counter()
        try:
            response = httpx.post(f"{server.url}gradio_api/call/classify", content=chunks(),
                                  headers=headers, timeout=60)  # fmt: skip
            status, text = response.status_code, response.text[:200]
        except httpx.HTTPError as error:
            status, text = 0, f"{type(error).__name__}: {error}"[:200]
        seconds = round(time.perf_counter() - started, 2)
        posts.append({"declared_length": declared, "status": status,
                      "sent_mb": round(sent / MB, 1), "seconds": seconds,
                      "answer": text})  # fmt: skip
    settled = settled_rss(server)
    figures = {
        "statuses": [p["status"] for p in posts],
        "sent_mb_before_answer": [p["sent_mb"] for p in posts],
        "seconds": [p["seconds"] for p in posts],
        "settled_over_idle_mb": round(settled / MB - idle_mb, 1),
        "answer": posts[0]["answer"],
    }
    targets = {
        "every POST got 413": all(p["status"] == 413 for p in posts),
        f"settled within {SETTLED_LIMIT_MB:.0f} MB of idle": (
            abs(settled / MB - idle_mb) <= SETTLED_LIMIT_MB
        ),
    }
    return figures, targets


def caption_all(png: bytes) -> Probe:
    """One upload of the big PNG, named 8 times in one /caption_files with beam search 8."""

    def probe(server: Server, idle_mb: float) -> tuple[dict, dict[str, bool]]:
        upload = _upload(server.url, "adversarial-8000.png", png)
        answer = call(server.url, "caption_files", [[upload] * 8, *BEAM_8], timeout=300)
        rows = []
        with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
            rows = json.loads(answer.data)[0]["data"]
        figures = {"event": answer.event, "seconds": round(answer.seconds, 1),
                   "rows": len(rows), "first_row": rows[0] if rows else answer.message[:200],
                   "upload_mb": round(len(png) / MB, 2)}  # fmt: skip
        return figures, {"answered": answer.event == "complete"}

    return probe


def explain_big(png: bytes) -> Probe:
    """/explain on the big (64 MP) PNG with a phrase."""

    def probe(server: Server, idle_mb: float) -> tuple[dict, dict[str, bool]]:
        upload = _upload(server.url, "adversarial-64mp.png", png)
        answer = call(server.url, "explain", [upload, "a red circle", MODEL], timeout=300)
        figures = {"event": answer.event, "seconds": round(answer.seconds, 1),
                   "answer": answer.message[:160]}  # fmt: skip
        return figures, {"answered": answer.event == "complete"}

    return probe


def peak_target(result: Result) -> Result:
    """Add the peak target (at most PEAK_LIMIT_MB over idle) to an image probe's result."""
    result.targets[f"peak <= +{PEAK_LIMIT_MB:.0f} MB"] = result.peak_over_idle_mb <= PEAK_LIMIT_MB
    return result


def _polite(url: str, ready: threading.Event) -> tuple[list[float], list[str]]:
    """The well-behaved client: a gradio_client session captioning the bundled scene
    POLITE_CAPTIONS times in turn, once `ready` is set; (latencies, errors)."""
    client = Client(url, verbose=False, download_files=False)
    latencies, errors = [], []
    ready.wait(60)
    try:
        for _ in range(POLITE_CAPTIONS):
            started = time.perf_counter()
            job = client.submit(handle_file(str(scene())), api_name="/caption")
            try:
                caption = job.result(timeout=30)
                if not (isinstance(caption, str) and caption.strip()):
                    errors.append(f"empty caption: {caption!r}")
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}"[:200])
                with contextlib.suppress(Exception):
                    job.cancel()
            latencies.append(time.perf_counter() - started)
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return latencies, errors


def flood(server: Server, idle_mb: float) -> tuple[dict, dict[str, bool]]:
    """70 heavy classifies at once from one session while another session captions."""
    labels = "\n".join(f"thing {i}" for i in range(2000))
    templates = "\n".join(f"a photo of {{}}, take {i}" for i in range(10))
    body = json.dumps({"data": [scene_image(), labels, templates, MODEL],
                       "session_hash": FLOOD_SESSION})  # fmt: skip
    base = server.url.rstrip("/")
    barrier, ready = threading.Barrier(FLOOD_CALLS), threading.Event()

    def post(_: int) -> tuple[int, str]:
        barrier.wait(30)
        try:
            response = httpx.post(f"{base}/gradio_api/call/classify", content=body,
                                  headers=JSON, timeout=60)  # fmt: skip
            return response.status_code, response.text[:300]
        except httpx.HTTPError as error:
            return 0, f"{type(error).__name__}: {error}"[:300]

    with concurrent.futures.ThreadPoolExecutor(FLOOD_CALLS + 2) as pool:
        polite = pool.submit(_polite, server.url, ready)
        started = time.monotonic()
        answers = list(pool.map(post, range(FLOOD_CALLS)))
        burst_s = time.monotonic() - started
        admitted = [json.loads(text)["event_id"] for status, text in answers if status == 200]
        ready.set()  # the polite client starts once the flood is in the queue
        # one stream carries every event of the flood's session, and ends after the last
        drain = pool.submit(read_events, base, "classify", admitted[0],
                            started + FLOOD_DRAIN_S) if admitted else None  # fmt: skip
        latencies, errors = polite.result(timeout=FLOOD_DRAIN_S)
        pairs, timed_out = drain.result(timeout=FLOOD_DRAIN_S + 60) if drain else ([], False)
    drain_s = time.monotonic() - started
    refused = [Answer(s, "http-error", t, 0).message for s, t in answers if s != 200]
    clear = [m for m in refused if any(words in m for words in REFUSALS)]
    again = call(server.url, "classify", [scene_image(), "a, b", "", MODEL], timeout=60,
                 session_hash=FLOOD_SESSION)  # fmt: skip
    figures = {
        "admitted": len(admitted),
        "refused_with_message": len(clear),
        "refused_otherwise": len(refused) - len(clear),
        "statuses": sorted({s for s, _ in answers}),
        "burst_s": round(burst_s, 2),
        "refusal": clear[0] if clear else (refused[0] if refused else None),
        "other_refusals": sorted({m[:120] for m in refused if m not in clear})[:3],
        "admitted_completed": sum(event == "complete" for event, _ in pairs),
        "admitted_errors": [data[:120] for event, data in pairs if event == "error"][:3],
        "drain_timed_out": timed_out,
        "drain_s": round(drain_s, 1),
        "readmitted_after_drain": again.event == "complete",
        "polite_latencies_s": [round(s, 2) for s in latencies],
        "polite_p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "polite_p95_s": round(percentile(latencies, 95), 2) if latencies else None,
        "polite_errors": errors,
    }
    targets = {
        f"admitted <= {MAX_PENDING}, the rest refused with the message": (
            0 < len(admitted) <= MAX_PENDING and len(clear) == FLOOD_CALLS - len(admitted)
        ),
        f"polite p95 <= {P95_LIMIT_S:.0f} s": bool(latencies)
        and (percentile(latencies, 95) <= P95_LIMIT_S),
        "polite errors 0": not errors and len(latencies) == POLITE_CAPTIONS,
    }
    return figures, targets


def upload_age(server: Server, idle_mb: float) -> tuple[dict, dict[str, bool]]:
    """3 uploads of 49 MiB and a "Caption all" CSV on a server with VLM_TEMP_MAX_AGE=5: none
    may be on disk after the age and two sweeps."""
    tag = os.urandom(4).hex()
    names = [f"adversarial-age-{tag}-{i}.bin" for i in range(UPLOAD_FILES)]
    statuses = []
    for name in names:
        data = os.urandom(UPLOAD_BYTES)
        try:
            _upload(server.url, name, data)
            statuses.append(200)
        except httpx.HTTPStatusError as error:
            statuses.append(error.response.status_code)
    del data
    image_name = f"adversarial-age-{tag}-scene.png"
    image = _upload(server.url, image_name, scene().read_bytes())
    answer = call(server.url, "caption_files", [[image], *GREEDY], timeout=120)
    root = server.log_path.parent  # the server's TMPDIR, Gradio's upload folder inside it
    wanted = {*names, image_name, "captions.csv"}

    def on_disk() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.name in wanted)  # fmt: skip

    found = on_disk()
    sweep = max(1, min(60, UPLOAD_AGE_S // 4))
    started = time.monotonic()
    deadline = started + UPLOAD_AGE_S + 2 * sweep
    left = found
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = on_disk()
    figures = {
        "upload_statuses": statuses,
        "csv_written": answer.event == "complete",
        "files_on_disk_after_requests": len(found),
        "csvs_on_disk_after_requests": sum(Path(p).name == "captions.csv" for p in found),
        "waited_s": round(time.monotonic() - started, 1),
        "files_left": len(left),
        "left": left[:8],
    }
    targets = {
        "every upload accepted and the CSV written": (
            statuses == [200] * UPLOAD_FILES and answer.event == "complete"
        ),
        "0 files left": not left,
    }
    return figures, targets


# ---------------------------------------------------------------------------- the run


def warm_up(server: Server) -> None:
    """One small request of each kind the probes send, so idle RSS includes what they load."""
    image = scene_image()
    call(server.url, "caption", [image, *GREEDY])
    call(server.url, "classify", [image, "a, b", "", MODEL])
    call(server.url, "explain", [image, "a circle", MODEL])
    upload = _upload(server.url, "warm-up.png", scene().read_bytes())
    call(server.url, "caption_files", [[upload], *BEAM_8])


def log_problems(server: Server) -> list[str]:
    """Lines of the server's log that point at a bug: tracebacks and errors."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    marks = ("Traceback", " ERROR ", "Exception in ASGI", "Killed")
    return [line[:300] for line in lines if any(mark in line for mark in marks)]


def run_adversarial(log=print, workdir: Path | None = None) -> dict:
    """Serve the app, measure its idle RSS, run the probes (upload-age on a server of its
    own); the report as a dict, "ok" when every target is met."""
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    png = big_png()
    log(f"an {BIG_SIDE}x{BIG_SIDE} PNG of {len(png) / MB:.1f} MB")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vlm-adv-")))
        results, servers = [], {}
        main_dir, age_dir = workdir / "main", workdir / "age"
        main_dir.mkdir(parents=True, exist_ok=True)
        age_dir.mkdir(parents=True, exist_ok=True)
        with Server(main_dir) as server:
            warm_up(server)
            idle = settled_rss(server)
            log(f"app up in {server.startup_s:.1f} s at {server.url}; idle RSS {idle / MB:.0f} MB")
            results.append(run_probe("huge-body", huge_body, server, idle, log))
            for name, probe in (("caption-all-8000", caption_all(png)),
                                ("explain-64mp", explain_big(png))):  # fmt: skip
                results.append(peak_target(run_probe(name, probe, server, idle, log)))
            results.append(run_probe("flood", flood, server, idle, log))
            servers["main"] = {"idle_rss_mb": round(idle / MB, 1),
                               "startup_s": round(server.startup_s, 1),
                               "log": str(server.log_path), "log_problems": log_problems(server),
                               "alive": server.process.poll() is None}  # fmt: skip
        env = {"VLM_TEMP_MAX_AGE": str(UPLOAD_AGE_S)}
        with Server(age_dir, env=env) as server:
            idle = settled_rss(server)
            log(f"second app (VLM_TEMP_MAX_AGE={UPLOAD_AGE_S}) up, idle RSS {idle / MB:.0f} MB")
            results.append(run_probe("upload-age", upload_age, server, idle, log))
            servers["upload-age"] = {"idle_rss_mb": round(idle / MB, 1),
                                     "startup_s": round(server.startup_s, 1),
                                     "log": str(server.log_path),
                                     "log_problems": log_problems(server),
                                     "alive": server.process.poll() is None}  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_1m_at_start": load_at_start},
        "servers": servers,
        "probes": [{**asdict(r), "ok": r.ok} for r in results],
        "ok": all(r.ok for r in results) and all(s["alive"] for s in servers.values()),
    }


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_figure, value)) + "]"
    return str(value)


def print_adversarial(report: dict) -> None:
    """The table: one row per probe, then each probe's figures and targets."""
    main = report["servers"]["main"]
    print(f"\nmain server: idle RSS {main['idle_rss_mb']:.0f} MB (started in "
          f"{main['startup_s']:.1f} s)")  # fmt: skip
    header = f"{'probe':<18}{'peak +MB':>9}{'settled +MB':>12}{'seconds':>9}  {'serving':<8}result"
    print(header)
    print("-" * len(header))
    for row in report["probes"]:
        print(
            f"{row['probe']:<18}{row['peak_over_idle_mb']:>9.0f}"
            f"{row['settled_over_idle_mb']:>+12.0f}{row['seconds']:>9.1f}  "
            f"{'yes' if row['serving'] else 'NO':<8}{'pass' if row['ok'] else 'FAIL'}"
        )
    for row in report["probes"]:
        print(f"\n{row['probe']} (idle {row['idle_mb']:.0f} MB):")
        for name, value in row["figures"].items():
            print(f"  {name}: {_figure(value)}"[:300])
        for name, met in row["targets"].items():
            print(f"  [{'pass' if met else 'FAIL'}] {name}")
        if row["error"]:
            print(f"  [FAIL] the probe failed: {row['error']}")
        if not row["serving"]:
            print(f"  [FAIL] a caption afterwards: {row['serving_answer']}")
    for name, server in report["servers"].items():
        for line in server["log_problems"][:10]:
            print(f"{name} server log: {line}")
    print(f"\n{'every target met' if report['ok'] else 'some targets missed'}")
