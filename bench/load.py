"""Load test: the demo under many users at once.

    python -m bench.load [--sessions 32] [--requests 10] [--rounds 3] [--abuse 2] [--out load.json]
    python -m bench.load --queue-probe     # a caption queued behind the heaviest classify
    python -m bench.load --adversarial [--out adversarial.json]   # abusive clients, bounded

Starts `app.py` on loopback in a subprocess (offline, so it serves the bundled `shapeworld`
model; its search index goes to a temporary folder), warms it up with one request of each
kind, then runs `--rounds` rounds. In each round `--sessions` gradio_client sessions (each a
new Client, so a new Gradio session) run at once, each sending `--requests` requests one after
another, the kinds taken in turn so that every kind is asked about equally: caption, classify,
answer, search, few_shot, explain — the app's own API names, with the bundled example images.

The server keeps Gradio's per-session state for `--max-sessions` sessions (VLM_MAX_SESSIONS;
by default as many as run at once), so each round's new sessions take the place of the last
round's and what remains of memory growth is what requests leave behind.

With `--abuse N` each session also sends N attacks through the raw HTTP API, one after each
legitimate request (the holes issue 23 found): a server path without `meta`, an SSRF URL,
an oversized data URL, a 20000x20000 data URL, a 3 MB few-shot text, 2,000 labels x 200
templates, NaN in a number field, and a zip of junk to the index. Each must get its clear
refusal; the server then runs with VLM_MAX_FILE_SIZE=2mb (so an oversized data URL is 3 MB,
not 70) and its TMPDIR in the work folder, where nothing may be left behind.

It reports errors (the target is 0), answers that differ from the same request's earlier
answer (greedy decoding is deterministic, so a difference means requests mixed up), p50/p95
latency per kind and overall (seen by the client, so queueing in Gradio's queue is included),
the server's peak RSS and its RSS after each round. Memory must not grow from round to round:
growth from the end of the first round to the end of the last beyond `--tolerance-mb` is
flagged. The exit status is 0 when there are no errors, no mixed-up answers and no such growth.

With `--adversarial` it runs instead the probes of `bench/adversarial.py`, each bounded in
count and time (about 5 minutes on 2 cores): 4 POSTs of a 200 MB body (each must get 413,
and RSS settle within 100 MB of idle), "Caption all" of one 8000x8000 PNG named 8 times with
beam search 8 and Explain on it (peak RSS at most +1 GB each), one client flooding 70 heavy
classifies at once (at most VLM_MAX_PENDING admitted, the rest refused with the message)
while another captions 10 times (p95 at most 5 s, no errors), and on a second server with
VLM_TEMP_MAX_AGE=5, 3 uploads of 49 MiB and a CSV (none left on disk after the age). It
prints a table (peak RSS over idle, settled RSS, whether a caption afterwards succeeds) and
each probe's figures; the exit status is 0 when every target is met. `--workdir DIR` keeps
the servers' folders and logs there (default: a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import datetime
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from gradio_client import Client, handle_file
from PIL import Image

from vlm.examples import EXAMPLES_DIR, photo_examples, shapeworld_examples

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = EXAMPLES_DIR
KINDS = ("caption", "classify", "answer", "search", "few_shot", "explain")
MB = 1 << 20


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """app.py in a subprocess on loopback, offline, with its index in `workdir`."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None, timeout: float = 300):
        port = free_port()
        # pinned: a HOME of its own (no Hugging Face cache, so no cached clipcap-coco) and,
        # of this shell's settings, only where it runs (threads, device); `env` adds more
        (workdir / "home").mkdir(exist_ok=True)
        where = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "VLM_DEVICE")
        environment = {
            **{name: os.environ[name] for name in where if name in os.environ},
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir / "home"),
            "LANG": "C.UTF-8",
            "TMPDIR": str(workdir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "VLM_INDEX_DIR": str(workdir / "indexes"),
            **(env or {}),
        }
        self.log_path = workdir / f"app-{port}.log"
        self._log = self.log_path.open("w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(port), *args],
            cwd=workdir,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}/"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except OSError:
                if time.perf_counter() - started > timeout:
                    self.stop()
                    raise RuntimeError(f"the app did not start in {timeout:.0f} s") from None
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - started
        self.psutil = psutil.Process(self.process.pid)

    def rss(self) -> int:
        """Resident memory of the server and any children, in bytes."""
        total = 0
        for process in [self.psutil, *self.psutil.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that just ended
                total += process.memory_info().rss
        return total

    def high_water_mark(self) -> int | None:
        """The kernel's peak RSS of the server process (Linux), in bytes."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


class PeakSampler(threading.Thread):
    """Samples the server's RSS every `interval` seconds and keeps the highest."""

    def __init__(self, server: Server, interval: float = 0.2):
        super().__init__(daemon=True)
        self.server, self.interval, self.peak = server, interval, 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.server.rss())
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.server.rss())
        return self.peak


# ---------------------------------------------------------------------------- the requests


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    question: str


def examples() -> tuple[list[Example], list[Path]]:
    """The bundled ShapeWorld scenes with their truth, and the bundled photos."""
    scenes = [
        Example(path, t["caption"], t["questions"][0][0]) for path, t in shapeworld_examples()
    ]
    return scenes, photo_examples()


LABELS = "\n".join(
    f"{color} {shape}"
    for color in ("red", "green", "blue", "yellow", "purple", "orange", "white")
    for shape in ("circle", "square", "triangle", "star", "cross")
)


def send(
    client: Client, kind: str, n: int, scenes: list[Example], photos: list[Path]
) -> tuple[str, str]:
    """Request number `n` of this kind. Returns what was asked (the kind and its input files)
    and a short signature of the answer, the same whenever the same request is sent again."""
    scene = scenes[n % len(scenes)]
    path = scene.path
    if kind == "caption" and n % 3 == 2 and photos:  # a third of the captions are of photos:
        path = photos[n % len(photos)]  # bigger uploads, longer decoding
    image, key = handle_file(str(path)), f"{kind}:{path.name}"
    if kind == "caption":
        caption = client.predict(image, api_name="/caption")
        assert isinstance(caption, str) and caption.strip(), caption
        return key, caption
    if kind == "classify":
        result, _ = client.predict(image, LABELS, "", api_name="/classify")
        return key, result["label"]
    if kind == "answer":
        answer, _ = client.predict(image, scene.question, "", api_name="/answer")
        assert isinstance(answer, str) and answer.strip(), answer
        return key, answer
    if kind == "search":
        hits = client.predict(scene.caption, None, 8, api_name="/search")
        assert len(hits) == 8, hits
        return key, " ".join(Path(hit["image"]).name for hit in hits[:3])
    if kind == "few_shot":  # two one-object examples: longer texts overflow the LM's 128 positions
        single = [s for s in scenes if " left of " not in s.caption]
        a, b = single[(n + 1) % len(single)], single[(n + 2) % len(single)]
        text = client.predict(
            handle_file(str(a.path)), f"Caption: {a.caption}",
            handle_file(str(b.path)), f"Caption: {b.caption}",
            None, "", image, "Caption:", 20, api_name="/few_shot",
        )  # fmt: skip
        assert isinstance(text, str), text
        return f"{key}:{a.path.name}:{b.path.name}", text
    if kind == "explain":
        heatmap = client.predict(image, scene.caption.split(" left of ")[0], api_name="/explain")
        assert Path(heatmap).stat().st_size > 0, heatmap
        return key, "image"
    raise ValueError(f"unknown kind {kind!r}")


# ---------------------------------------------------------------------------- the attacks

ABUSE_MAX_FILE_SIZE = 2 << 20  # the server's VLM_MAX_FILE_SIZE when attacks are mixed in
FILE_DATA = {"_type": "gradio.FileData"}


def raw_call(url: str, endpoint: str, data: list, timeout: float = 300) -> tuple[str, str]:
    """(event, data text) of one call through the raw HTTP API: POST, then the event stream."""
    base = url.rstrip("/")
    body = json.dumps({"data": data})  # NaN is written as NaN
    response = httpx.post(f"{base}/gradio_api/call/{endpoint}", content=body, timeout=60,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    if response.status_code != 200:
        return "http-error", response.text[:300]
    event_id = response.json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/{endpoint}/{event_id}", timeout=timeout).text
    last = ("none", stream[-300:])
    for block in stream.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") in ("complete", "error"):
            last = (lines["event"], lines.get("data", ""))
    return last


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _junk_zip() -> bytes:
    """20 entries of 200,000 zero bytes named .png: under the zip-bomb floor, not images."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(20):
            archive.writestr(f"junk-{i}.png", b"\0" * 200_000)
    return buffer.getvalue()


def _upload(url: str, name: str, data: bytes) -> dict:
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload",
                          files=[("files", (name, data))], timeout=60)  # fmt: skip
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": name, "meta": FILE_DATA}


def attacks() -> dict:
    """Each attack: (endpoint, data, or a function of the url giving it; what the answer must
    contain). Built once: the big payloads are shared by every session."""
    decoding = ["greedy", 3, 0.9, 1.0, 30, "shapeworld"]
    labels = "\n".join(f"thing {i}" for i in range(2000))
    templates = "\n".join(f"a photo of {{}}, take {i}" for i in range(200))
    scene = next((EXAMPLES / "shapeworld").glob("*.png"))
    image = {"url": _data_url(scene.read_bytes()), "meta": FILE_DATA}
    oversized = _data_url(os.urandom(ABUSE_MAX_FILE_SIZE + (1 << 20)))
    bomb = _data_url(_png(Image.new("1", (20000, 20000))))
    junk = _junk_zip()
    return {
        "path-no-meta": ("caption", [{"path": "/etc/passwd"}, *decoding], "does not read"),
        "ssrf-url": ("caption", [{"path": "http://169.254.169.254/latest/meta-data/x.png",
                                  "meta": FILE_DATA}, *decoding], "does not fetch URLs"),
        "oversized-data-url": ("caption", [{"url": oversized, "meta": FILE_DATA}, *decoding],
                               "too large"),
        "pixel-bomb-data-url": ("explain", [{"url": bomb, "meta": FILE_DATA}, "a circle",
                                            "shapeworld"], "400,000,000 pixels"),
        "few-shot-3mb-text": ("few_shot", [image, "Caption: " + "z " * 1_500_000, None, "",
                                           None, "", image, "Caption:", 10, "shapeworld"],
                              "Text 1 is too long"),
        "classify-2000x200": ("classify", [image, labels, templates, "shapeworld"],
                              "too many templates"),
        "nan-max-length": ("caption", [image, *decoding[:4], math.nan, "shapeworld"],
                           "Max length must be between"),
        "zip-of-junk": ("index_add",
                        lambda url: [[_upload(url, "junk.zip", junk)], "shapeworld"],
                        "Added 0 image(s)"),
    }  # fmt: skip


def attack(url: str, name: str, table: dict) -> str | None:
    """Send one attack; None when it got its refusal, else what went wrong."""
    endpoint, data, expected = table[name]
    try:
        event, text = raw_call(url, endpoint, data(url) if callable(data) else data)
    except Exception as error:
        return f"{name}: {type(error).__name__}: {error}"[:300]
    if expected not in text:
        return f"{name}: {event}: {text[:200]}"
    return None


@dataclass
class Record:
    kind: str
    key: str  # the request: kind and input
    seconds: float
    signature: str | None = None
    error: str | None = None


def session(
    url: str,
    index: int,
    requests: int,
    downloads: str,
    scenes,
    photos,
    abuse: int = 0,
    table: dict | None = None,
) -> tuple[list[Record], list[Record]]:
    """One user: a new gradio_client session sending `requests` requests in turn, with
    `abuse` attacks from `table` mixed in, one after each request. Returns (requests,
    attacks)."""
    records, attacked = [], []
    try:
        client = Client(url, verbose=False, download_files=downloads)
    except Exception as error:  # a session that cannot even connect is an error too
        return [Record("connect", "connect", 0.0, error=f"{type(error).__name__}: {error}")], []
    names = list(table or {})
    for i in range(requests):
        kind = KINDS[(index + i) % len(KINDS)]
        n = index * requests + i
        started = time.perf_counter()
        try:
            key, signature = send(client, kind, n, scenes, photos)
            records.append(Record(kind, key, time.perf_counter() - started, signature))
        except Exception as error:
            message = f"{kind}: {type(error).__name__}: {error}"[:300]
            records.append(Record(kind, kind, time.perf_counter() - started, error=message))
        if i < abuse and names:
            name = names[(index * abuse + i) % len(names)]
            started = time.perf_counter()
            problem = attack(url, name, table)
            attacked.append(Record(name, name, time.perf_counter() - started, error=problem))
    with contextlib.suppress(Exception):
        client.close()
    return records, attacked


def run_round(
    url: str, sessions: int, requests: int, downloads: str, abuse: int = 0, table=None
) -> tuple[list[Record], list[Record]]:
    """One round; (the requests' records, the attacks' records)."""
    scenes, photos = examples()
    with concurrent.futures.ThreadPoolExecutor(max_workers=sessions) as pool:
        futures = [
            pool.submit(session, url, s, requests, downloads, scenes, photos, abuse, table)
            for s in range(sessions)
        ]
        results = [future.result() for future in futures]
    return [r for rs, _ in results for r in rs], [a for _, attacks in results for a in attacks]


# ---------------------------------------------------------------------------- the report


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_table(records: list[Record]) -> dict:
    table = {}
    for kind in [*KINDS, "overall"]:
        seconds = [r.seconds for r in records if r.error is None and kind in (r.kind, "overall")]
        if seconds:
            table[kind] = {
                "n": len(seconds),
                "p50_ms": round(1000 * percentile(seconds, 50), 1),
                "p95_ms": round(1000 * percentile(seconds, 95), 1),
                "max_ms": round(1000 * max(seconds), 1),
            }
    return table


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_load(
    sessions: int = 32,
    requests: int = 10,
    rounds: int = 3,
    tolerance_mb: float = 64.0,
    max_sessions: int | None = None,
    env: dict | None = None,
    log=print,
    abuse: int = 0,
) -> dict:
    """Start the app, warm it up, run the rounds (with `abuse` attacks per session mixed
    in); the report as a dict."""
    max_sessions = max_sessions or sessions
    env = {"VLM_MAX_SESSIONS": str(max_sessions), **(env or {})}
    table = attacks() if abuse else None
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="vlm-load-") as tmp:
        workdir = Path(tmp)
        downloads = str(workdir / "downloads")
        if abuse:
            (workdir / "tmp").mkdir()
            env = {"VLM_MAX_FILE_SIZE": f"{ABUSE_MAX_FILE_SIZE}b", "TMPDIR": str(workdir / "tmp"),
                   **env}  # fmt: skip
        with Server(workdir, env=env) as server:
            rss_at_start = server.rss()
            log(
                f"app up in {server.startup_s:.1f} s at {server.url}, RSS "
                f"{rss_at_start / MB:.0f} MB; warming up"
            )
            sampler = PeakSampler(server)
            sampler.start()
            started = time.perf_counter()
            warmup, _ = run_round(server.url, 1, len(KINDS), downloads)
            warmup_s = time.perf_counter() - started
            records, per_round, reference, attacked = [], [], {}, []
            inconsistent = []
            for number in range(1, rounds + 1):
                started = time.perf_counter()
                batch, hits = run_round(server.url, sessions, requests, downloads, abuse, table)
                attacked += hits
                seconds = time.perf_counter() - started
                for record in batch:  # the same request must get the same answer
                    if record.error is None:
                        expected = reference.setdefault(record.key, record.signature)
                        if record.signature != expected:
                            inconsistent.append(
                                f"{record.key}: {record.signature!r} after {expected!r}"
                            )
                time.sleep(1.0)  # let the server finish its bookkeeping before measuring
                rss = server.rss()
                errors = sum(r.error is not None for r in batch)
                per_round.append(
                    {
                        "round": number,
                        "seconds": round(seconds, 1),
                        "requests": len(batch),
                        "attacks": len(hits),
                        "errors": errors,
                        "requests_per_s": round(len(batch) / seconds, 2),
                        "rss_mb_after": round(rss / MB, 1),
                    }
                )
                log(
                    f"round {number}/{rounds}: {len(batch)} requests in {seconds:.1f} s, "
                    f"{errors} errors, RSS {rss / MB:.0f} MB"
                )
                records += batch
            peak = sampler.stop()
            high_water = server.high_water_mark()
            alive = server.process.poll() is None
            server_log_tail = server.log_path.read_text()[-2000:]
            leftovers = sorted(
                str(p.relative_to(workdir))
                for p in [*workdir.glob("tmp/vlm-unpack-*"),
                          *workdir.glob("indexes/*/images/*")]
            )  # fmt: skip

    after = [r["rss_mb_after"] for r in per_round]
    growth = round(after[-1] - after[0], 1) if after else 0.0
    errors = [r.error for r in records if r.error is not None]
    warmup_errors = [r.error for r in warmup if r.error is not None]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_1m_at_start": load_at_start},
        "config": {
            "sessions": sessions,
            "requests_per_session": requests,
            "rounds": rounds,
            "kinds": list(KINDS),
            "tolerance_mb": tolerance_mb,
            "server_max_sessions": int(env["VLM_MAX_SESSIONS"]),
            "omp_num_threads": env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS")),
            "queue_concurrency": 2,
            "attacks_per_session": abuse,
        },
        "startup_s": round(server.startup_s, 1),
        "warmup_s": round(warmup_s, 1),
        "requests": len(records),
        "errors": len(errors),
        "error_samples": sorted(set(errors + warmup_errors))[:10],
        "warmup_errors": len(warmup_errors),
        "attacks": len(attacked),
        "attacks_not_refused": sum(a.error is not None for a in attacked),
        "attack_samples": sorted({a.error for a in attacked if a.error})[:10],
        "attack_latency": {
            name: round(1000 * max(a.seconds for a in attacked if a.kind == name), 1)
            for name in sorted({a.kind for a in attacked})
        },
        "files_left_behind": leftovers,
        "inconsistent": len(inconsistent),
        "inconsistent_samples": inconsistent[:10],
        "latency": latency_table(records),
        "rounds": per_round,
        "rss_mb_at_start": round(rss_at_start / MB, 1),
        "peak_rss_mb": round(max(peak, high_water or 0) / MB, 1),
        "peak_rss_sampled_mb": round(peak / MB, 1),
        "rss_growth_mb": growth,
        "rss_growth_ok": growth <= tolerance_mb,
        "server_alive": alive,
    }
    if errors or warmup_errors or not alive:
        report["server_log_tail"] = server_log_tail
    report["ok"] = bool(
        alive and not errors and not warmup_errors and not inconsistent and report["rss_growth_ok"]
        and not report["attacks_not_refused"] and not leftovers
    )  # fmt: skip
    return report


def print_report(report: dict) -> None:
    config = report["config"]
    print(
        f"\n{config['sessions']} sessions x {config['requests_per_session']} requests x "
        f"{config['rounds']} rounds = {report['requests']} requests; "
        f"errors {report['errors']}, mixed-up answers {report['inconsistent']}"
    )
    print(f"{'kind':<10}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for kind, row in report["latency"].items():
        print(
            f"{kind:<10}{row['n']:>6}{row['p50_ms']:>10.0f}{row['p95_ms']:>10.0f}"
            f"{row['max_ms']:>10.0f}"
        )
    after = ", ".join(f"{r['rss_mb_after']:.0f}" for r in report["rounds"])
    flag = "ok" if report["rss_growth_ok"] else "GROWS beyond the tolerance"
    print(
        f"peak RSS {report['peak_rss_mb']:.0f} MB; RSS after each round (MB): {after}; "
        f"growth {report['rss_growth_mb']:+.1f} MB ({flag}, tolerance "
        f"{config['tolerance_mb']:.0f} MB)"
    )
    if report["attacks"]:
        print(
            f"attacks {report['attacks']}, not refused {report['attacks_not_refused']}; "
            f"files left behind {len(report['files_left_behind'])}; slowest refusal (ms): "
            + ", ".join(f"{k} {v:.0f}" for k, v in report["attack_latency"].items())
        )
    for error in report["error_samples"]:
        print("error:", error)
    for sample in report["attack_samples"]:
        print("attack not refused:", sample)
    for sample in report["inconsistent_samples"]:
        print("mixed up:", sample)


# ---------------------------------------------------------------------------- the queue


def _probe_once(env: dict, templates: int, log=print) -> dict:
    """A classify of 2,000 labels x `templates` templates, and one second later a caption:
    how long each took, as their clients saw it."""
    labels = "\n".join(f"thing {i}" for i in range(2000))
    lines = "\n".join(f"a photo of {{}}, take {i}" for i in range(templates))
    scene = next((EXAMPLES / "shapeworld").glob("*.png"))
    image = {"url": _data_url(scene.read_bytes()), "meta": FILE_DATA}
    decoding = ["greedy", 3, 0.9, 1.0, 30, "shapeworld"]
    with (
        tempfile.TemporaryDirectory(prefix="vlm-probe-") as tmp,
        Server(Path(tmp), env=env) as server,
    ):
        raw_call(server.url, "caption", [image, *decoding])  # warm up
        raw_call(server.url, "classify", [image, "a, b", "", "shapeworld"])
        timings = {}

        def timed(name, endpoint, data):
            started = time.perf_counter()
            event, text = raw_call(server.url, endpoint, data)
            timings[name] = {"seconds": round(time.perf_counter() - started, 2), "event": event,
                             "answer": text[:120]}  # fmt: skip

        heavy = threading.Thread(target=timed, args=(
            "classify", "classify", [image, labels, lines, "shapeworld"]))  # fmt: skip
        heavy.start()
        time.sleep(1.0)
        timed("caption_sent_1s_later", "caption", [image, *decoding])
        heavy.join()
        timed("caption_alone", "caption", [image, *decoding])
    log(f"2,000 labels x {templates} templates: {timings}")
    return {"labels": 2000, "templates": templates, **timings}


def queue_probe(log=print) -> dict:
    """A caption behind the heaviest classify, without the limits (issue 23's 2,000 x 200)
    and with them (200 templates refused; the heaviest allowed, 2,000 x 10)."""
    unlimited = {"VLM_MAX_TEMPLATES": "1000", "VLM_MAX_CLASSIFY_TEXTS": "1000000000"}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "without_limits_2000x200": _probe_once(unlimited, 200, log),
        "with_limits_2000x200": _probe_once({}, 200, log),
        "with_limits_2000x10": _probe_once({}, 10, log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=32, help="concurrent users (32)")
    parser.add_argument("--requests", type=int, default=10, help="requests per session (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument(
        "--tolerance-mb",
        type=float,
        default=64.0,
        help="RSS growth from the first round to the last that is flagged (64)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        help="sessions whose state the server keeps (VLM_MAX_SESSIONS; default: --sessions)",
    )
    parser.add_argument(
        "--abuse", type=int, default=2, help="attacks per session, mixed in (2; 0: none)"
    )
    parser.add_argument(
        "--queue-probe", action="store_true",
        help="instead: how long a caption waits behind the heaviest classify, with the limits "
        "and without them",
    )  # fmt: skip
    parser.add_argument(
        "--adversarial", action="store_true",
        help="instead: the adversarial probes (bench/adversarial.py; see above)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", type=Path,
        help="with --adversarial: keep the servers' folders and logs here",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if min(args.sessions, args.requests, args.rounds) < 1 or args.abuse < 0:
        parser.error("--sessions, --requests and --rounds must be at least 1, --abuse 0")
    if args.adversarial:
        from .adversarial import print_adversarial, run_adversarial  # it imports this module

        report = run_adversarial(workdir=args.workdir)
        print_adversarial(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if report["ok"] else 1
    if args.queue_probe:
        report = queue_probe()
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    report = run_load(
        args.sessions, args.requests, args.rounds, args.tolerance_mb, args.max_sessions,
        abuse=args.abuse,
    )  # fmt: skip
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
