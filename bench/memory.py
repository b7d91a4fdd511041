"""memory: peak RSS of a fresh process that imports vlm, loads the default model and
captions one image, against a fresh process that only imports torch.

The default model is the bundled `shapeworld` preset. While assets/shapeworld is not built
yet, the benchmark's full-size random pipeline (ViT-B-32 + GPT-2 124M + mapper), saved to a
temporary folder, is loaded instead, and the JSON's `model` says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .common import REPO, Context, ratio_metric, write_jpegs

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
what = sys.argv[1]
if what == "torch":
    import torch
else:
    import vlm
if what == "caption":
    import torch
    from PIL import Image
    model, device, image, tokens = sys.argv[2:6]
    pipeline = vlm.Pipeline.from_pretrained(model, device=device)
    pipeline.caption(Image.open(image), max_new_tokens=int(tokens))
try:  # VmHWM: this process image's own peak (ru_maxrss would include the parent's, kept
    # across fork + exec on Linux)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak_mb = int(status.split()[0]) / 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / (2**20 if sys.platform == "darwin" else 2**10)
result = {"peak_rss_mb": peak_mb}
if what == "caption" and device.startswith("cuda"):
    result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
result["seconds"] = time.perf_counter() - start
print(json.dumps(result))
"""


def measure(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memory child {args[:1]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict:
    from vlm.presets import PRESETS

    if PRESETS["shapeworld"].is_cached():
        model, label = "shapeworld", "shapeworld (bundled preset)"
    else:
        model = str(ctx.tmp / "pipeline")
        ctx.pipeline.save_pretrained(model)
        label = f"{ctx.sizes.model}-size random pipeline (assets/shapeworld not built yet)"
    image = write_jpegs(ctx.tmp / "memory", ctx.images(1, offset=3000))[0]

    torch_only = measure("torch")
    vlm_only = measure("vlm")
    caption = measure("caption", model, str(ctx.device), str(image), str(ctx.sizes.new_tokens))
    bare = torch_only["peak_rss_mb"]
    metrics = [
        ratio_metric("import vlm (peak RSS MB)", vlm_only["peak_rss_mb"], bare, "MB",
                     vlm_only["peak_rss_mb"] / bare, "ours MB / import torch MB"),
        ratio_metric("load + 1 caption (peak RSS MB)", caption["peak_rss_mb"], bare, "MB",
                     caption["peak_rss_mb"] / bare, "ours MB / import torch MB", note=label),
    ]  # fmt: skip
    return {
        "metrics": metrics,
        "details": {"model": label, "import_torch": torch_only, "import_vlm": vlm_only,
                    "load_and_caption": caption},
    }  # fmt: skip
