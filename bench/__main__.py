"""Run the benchmarks, print a table, optionally write JSON (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from . import caption, index, memory, search, stream, video, zeroshot
from .common import Context, Metric, machine_info, seed_everything

BENCHMARKS = {
    "caption": caption.run,
    "stream": stream.run,
    "zeroshot": zeroshot.run,
    "index": index.run,
    "search": search.run,
    "memory": memory.run,
    "video": video.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes on 2 cores")
    parser.add_argument(
        "--tiny", action="store_true", help="toy models and sizes, to test the harness only"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    args.names = list(BENCHMARKS)
    if args.only:
        args.names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    return args


def _cell(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.4g} {unit}".strip()


def table(results: dict) -> str:
    header = ("benchmark", "metric", "ours", "reference", "ratio", "target", "met")
    rows = [header]
    for name, result in results.items():
        if "error" in result:
            rows.append((name, "ERROR: " + result["error"][:60], "", "", "", "", ""))
        for m in result["metrics"]:
            rows.append((
                name, m.name, _cell(m.ours, m.unit), _cell(m.reference, m.unit),
                "-" if m.ratio is None else f"{m.ratio:.3g}x", m.target or "-", _cell(m.met),
            ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(args.mode, args.device)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    try:
        for name in args.names:
            print(f"[bench] {name} ({args.mode}, {args.device}) ...", file=sys.stderr, flush=True)
            seed_everything()
            start = time.perf_counter()
            try:
                result = BENCHMARKS[name](ctx)
            except Exception as error:  # report it, run the others
                traceback.print_exc()
                result = {"error": f"{type(error).__name__}: {error}", "metrics": []}
            result["seconds"] = time.perf_counter() - start
            results[name] = result
    finally:
        ctx.close()
    total = time.perf_counter() - started

    print(table(results))
    checked = [m for r in results.values() for m in r["metrics"] if m.met is not None]
    met = sum(m.met for m in checked)
    print(f"\ntargets met: {met}/{len(checked)}; total {total:.1f} s ({args.mode}, {args.device})")
    if args.out:
        report = {
            "mode": args.mode,
            "benchmarks_run": args.names,
            "machine": machine_info(ctx.device),
            "sizes": dataclasses.asdict(ctx.sizes),
            "model_build_s": ctx.build_seconds,
            "total_s": total,
            "targets": {"met": met, "checked": len(checked)},
            "results": {
                name: {**r, "metrics": [dataclasses.asdict(m) for m in r["metrics"]]}
                for name, r in results.items()
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=_json_default))
    return 1 if any("error" in r for r in results.values()) else 0


def _json_default(value):
    if isinstance(value, Metric):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
