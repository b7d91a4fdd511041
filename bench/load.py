"""Load test: the demo under many users at once.

    python -m bench.load [--sessions 32] [--requests 10] [--rounds 3] [--out load.json]

Starts `app.py` on loopback in a subprocess (offline, so it serves the bundled `shapeworld`
model; its search index goes to a temporary folder), warms it up with one request of each
kind, then runs `--rounds` rounds. In each round `--sessions` gradio_client sessions (each a
new Client, so a new Gradio session) run at once, each sending `--requests` requests one after
another, the kinds taken in turn so that every kind is asked about equally: caption, classify,
answer, search, few_shot, explain — the app's own API names, with the bundled example images.

The server keeps Gradio's per-session state for `--max-sessions` sessions (VLM_MAX_SESSIONS;
by default as many as run at once), so each round's new sessions take the place of the last
round's and what remains of memory growth is what requests leave behind.

It reports errors (the target is 0), answers that differ from the same request's earlier
answer (greedy decoding is deterministic, so a difference means requests mixed up), p50/p95
latency per kind and overall (seen by the client, so queueing in Gradio's queue is included),
the server's peak RSS and its RSS after each round. Memory must not grow from round to round:
growth from the end of the first round to the end of the last beyond `--tolerance-mb` is
flagged. The exit status is 0 when there are no errors, no mixed-up answers and no such growth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
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
from dataclasses import dataclass
from pathlib import Path

import psutil
from gradio_client import Client, handle_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
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
    folder = EXAMPLES / "shapeworld"
    truth = json.loads((folder / "captions.json").read_text())
    scenes = [
        Example(folder / name, t["caption"], t["questions"][0][0])
        for name, t in sorted(truth.items())
    ]
    return scenes, sorted((EXAMPLES / "photos").glob("*.jpg"))


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
    if kind == "few_shot":  # two one-object examples: longer texts overflow the LM's 96 positions
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


@dataclass
class Record:
    kind: str
    key: str  # the request: kind and input
    seconds: float
    signature: str | None = None
    error: str | None = None


def session(url: str, index: int, requests: int, downloads: str, scenes, photos) -> list[Record]:
    """One user: a new gradio_client session sending `requests` requests in turn."""
    records = []
    try:
        client = Client(url, verbose=False, download_files=downloads)
    except Exception as error:  # a session that cannot even connect is an error too
        return [Record("connect", "connect", 0.0, error=f"{type(error).__name__}: {error}")]
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
    with contextlib.suppress(Exception):
        client.close()
    return records


def run_round(url: str, sessions: int, requests: int, downloads: str) -> list[Record]:
    scenes, photos = examples()
    with concurrent.futures.ThreadPoolExecutor(max_workers=sessions) as pool:
        futures = [
            pool.submit(session, url, s, requests, downloads, scenes, photos)
            for s in range(sessions)
        ]
        return [record for future in futures for record in future.result()]


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
) -> dict:
    """Start the app, warm it up, run the rounds; the report as a dict."""
    max_sessions = max_sessions or sessions
    env = {"VLM_MAX_SESSIONS": str(max_sessions), **(env or {})}
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="vlm-load-") as tmp:
        workdir = Path(tmp)
        downloads = str(workdir / "downloads")
        with Server(workdir, env=env) as server:
            rss_at_start = server.rss()
            log(
                f"app up in {server.startup_s:.1f} s at {server.url}, RSS "
                f"{rss_at_start / MB:.0f} MB; warming up"
            )
            sampler = PeakSampler(server)
            sampler.start()
            started = time.perf_counter()
            warmup = run_round(server.url, 1, len(KINDS), downloads)
            warmup_s = time.perf_counter() - started
            records, per_round, reference = [], [], {}
            inconsistent = []
            for number in range(1, rounds + 1):
                started = time.perf_counter()
                batch = run_round(server.url, sessions, requests, downloads)
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
        },
        "startup_s": round(server.startup_s, 1),
        "warmup_s": round(warmup_s, 1),
        "requests": len(records),
        "errors": len(errors),
        "error_samples": sorted(set(errors + warmup_errors))[:10],
        "warmup_errors": len(warmup_errors),
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
    )
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
    for error in report["error_samples"]:
        print("error:", error)
    for sample in report["inconsistent_samples"]:
        print("mixed up:", sample)


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
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if min(args.sessions, args.requests, args.rounds) < 1:
        parser.error("--sessions, --requests and --rounds must be at least 1")
    report = run_load(
        args.sessions, args.requests, args.rounds, args.tolerance_mb, args.max_sessions
    )
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
