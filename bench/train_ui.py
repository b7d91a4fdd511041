"""The Train tab against the command line, on README's quick-start data.

    python -m bench.train_ui [--images 300] [--steps 400] [--out train_ui.json]

Writes the quick start's data (`vlm shapeworld-data`: ShapeWorld scenes captioned in
other words than the bundle's), runs README's quick-start command (`vlm train --data …
--encoder local-dir:assets/shapeworld/encoder --lm-steps 1000 --lm-batch-size 16 --val-every
25 --early-stopping 4 --prefix-steps 400 --prefix-batch-size 32`), then serves `app.py
--allow-training` on loopback and runs the same training through the page's API
(`/train_start` with the data as a zip, base "shapeworld encoder + an LM learned on your
captions", the recipe's mapper), polling `/train_status` every second. Meanwhile a second
client captions a bundled scene with the bundled model every 5 s.

It prints, each against its target: the page run's held-out BLEU-4 against the CLI's on the
same split (within 0.02), its time from Start to done (at most 5 minutes), the time to its
first loss point (at most 10 s), the other client's captions during training (all answered;
their latency), and the server's RSS (with its training child) before and during training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from gradio_client import Client, handle_file

from vlm.examples import shapeworld_examples
from vlm.shapeworld import write_captioned_folder

from .load import MB, REPO, Server, machine, percentile

BASE = "shapeworld encoder + an LM learned on your captions"


def cli_run(data: Path, out: Path, steps: int) -> tuple[float, float]:
    """README's quick-start command; (held-out BLEU-4, seconds)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "vlm", "train", "--data", str(data), "--out", str(out),
               "--encoder", f"local-dir:{REPO / 'assets' / 'shapeworld' / 'encoder'}",
               "--lm-steps", "1000", "--lm-batch-size", "16", "--val-every", "25",
               "--early-stopping", "4", "--prefix-steps", str(steps),
               "--prefix-batch-size", "32"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    scores = next(r["scores"] for r in reversed(rows) if r.get("stage") == "eval")
    return scores["BLEU-4"], seconds


def polite(url: str, stop: threading.Event, latencies: list, errors: list) -> None:
    """Caption a bundled scene with the bundled model every 5 s until `stop`."""
    client = Client(url, verbose=False)
    image = str(shapeworld_examples()[0][0])
    while not stop.wait(5):
        started = time.perf_counter()
        try:
            client.predict(handle_file(image), api_name="/caption")
            latencies.append(time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 (counted: the target is none)
            errors.append(str(error)[:200])


def page_run(url: str, archive: Path, steps: int, server: Server) -> dict:
    client = Client(url, verbose=False)
    stop, latencies, errors = threading.Event(), [], []
    other = threading.Thread(target=polite, args=(url, stop, latencies, errors), daemon=True)
    other.start()
    idle = server.rss()
    started = time.perf_counter()
    job = client.predict(handle_file(str(archive)), BASE, steps, "bench", api_name="/train_start")
    first, peak, status = None, idle, {}
    while True:
        status = client.predict(job, api_name="/train_status")
        peak = max(peak, server.rss())
        if first is None and status["losses"]:
            first = time.perf_counter() - started
        if status["state"] in ("done", "stopped", "failed"):
            break
        time.sleep(1)
    seconds = time.perf_counter() - started
    stop.set()
    other.join(timeout=60)
    return {
        "state": status["state"], "error": status["error"], "seconds": round(seconds, 1),
        "first_loss_s": None if first is None else round(first, 1),
        "bleu4": status["scores"].get("BLEU-4"), "steps_done": status["step"],
        "rss_idle_mb": round(idle / MB), "rss_peak_mb": round(peak / MB),
        "other_captions": len(latencies), "other_errors": errors,
        "other_p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "other_max_s": round(max(latencies), 2) if latencies else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlm-train-ui-") as scratch:
        scratch = Path(scratch)
        data = scratch / "own"
        write_captioned_folder(data, args.images)
        archive = scratch / "own.zip"
        with zipfile.ZipFile(archive, "w") as out:
            for path in sorted(data.iterdir()):
                out.write(path, f"own/{path.name}")
        cli_bleu, cli_seconds = cli_run(data, scratch / "cli", args.steps)
        print(f"CLI: BLEU-4 {cli_bleu:.4f} in {cli_seconds:.0f} s")
        (scratch / "server").mkdir()
        with Server(scratch / "server", "--allow-training") as server:
            page = page_run(server.url, archive, args.steps, server)
    targets = {
        "page BLEU-4 within 0.02 of the CLI's": page["bleu4"] is not None
        and abs(page["bleu4"] - cli_bleu) <= 0.02,
        "done in at most 5 minutes": page["state"] == "done" and page["seconds"] <= 300,
        "first loss point within 10 s": page["first_loss_s"] is not None
        and page["first_loss_s"] <= 10,
        "the other client's captions all answered": page["other_captions"] > 0
        and not page["other_errors"],
    }  # fmt: skip
    report = {"machine": machine(), "images": args.images, "steps": args.steps,
              "cli": {"bleu4": cli_bleu, "seconds": round(cli_seconds, 1)}, "page": page,
              "targets": targets}  # fmt: skip
    print(json.dumps(page, indent=1))
    for name, met in targets.items():
        print(f"[{'pass' if met else 'FAIL'}] {name}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
