"""train_prefix: how fast the prefix stage trains at full size, to size real runs.

`python -m bench.train_prefix [--device cuda] [--tiny] [--out FILE]` builds open_clip ViT-B-32
and GPT-2 124M with random weights (speed does not depend on the weights), writes a folder of
synthetic photos with sidecar captions, and runs the real trainer (`vlm.training.train`, the
`python -m vlm train --data … --encoder … --lm …` path) on it:

1. feature caching: images/s of decoding + the frozen encoder into the disk cache;
2. prefix training from the cache, for ClipCap's two mappers (transformer on a frozen LM,
   batch 40 as in ClipCap; MLP, batch 40) and the transformer at batch 256: samples/s
   (steady state: after the first tenth of the steps) and peak GPU memory.

It ends with what that means for COCO (Karpathy train: 113,287 images, 566,747 captions):
the time of one feature pass and of ClipCap's 10 epochs at the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import full_pipeline, machine_info, photo, tiny_pipeline

COCO_IMAGES, COCO_CAPTIONS = 113_287, 566_747
CONFIGS = {  # name: (mapper options, batch size)
    "transformer b40": (dict(kind="transformer", prefix_length=10, clip_length=10,
                             num_layers=8), 40),
    "mlp b40": (dict(kind="mlp", prefix_length=10), 40),
    "transformer b256": (dict(kind="transformer", prefix_length=10, clip_length=10,
                              num_layers=8), 256),
}  # fmt: skip


def write_data(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """n JPEG photos with a caption each (sidecar .txt), as a `folder` dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "a photo of some {} shapes on a smooth {} background with a little noise"
    for i in range(n):
        photo(i, size).save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(words.format(i % 7, ["red", "blue"][i % 2]))
    return folder


def save_parts(pipeline, root: Path) -> tuple[str, str]:
    pipeline.encoder.save(root / "encoder")
    pipeline.lm.save_pretrained(root / "lm")
    pipeline.tokenizer.save_pretrained(root / "lm")
    return f"local-dir:{root / 'encoder'}", str(root / "lm")


def steady_rate(log: Path, stage: str = "prefix") -> tuple[float, int]:
    """Samples/s between the first logged step after a tenth of the run and the last."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == stage]
    first = next(r for r in rows if r["step"] >= rows[-1]["step"] // 10)
    last = rows[-1]
    samples = last["samples"] - first["samples"]
    return samples / max(1e-9, last["seconds"] - first["seconds"]), last["step"] + 1


def run(device: str, tiny: bool, steps: int, images: int) -> dict:
    from vlm.data import FileDataset
    from vlm.features import FeatureCache
    from vlm.training import TrainConfig, train

    os.environ["VLM_DEVICE"] = device
    build = tiny_pipeline if tiny else full_pipeline
    results: dict = {"machine": machine_info(torch.device(device)), "configs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        pipeline = build(device)
        encoder, lm = save_parts(pipeline, root)
        data = write_data(root / "data", images, (160, 120) if tiny else (640, 480))

        # 1. the feature pass (decode in workers + frozen encoder), into a fresh cache
        cache = FeatureCache(root / "features", pipeline)
        tic = time.perf_counter()
        cache.add(FileDataset([data], val_fraction=0).examples(), batch_size=128)
        seconds = time.perf_counter() - tic
        results["features_images_per_s"] = images / seconds
        del pipeline

        # 2. prefix training from the cache, each mapper and batch size
        for name, (mapper, batch) in CONFIGS.items():
            if tiny:
                mapper = {**mapper, "num_layers": 1} if "num_layers" in mapper else mapper
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = root / name.replace(" ", "-")
            config = TrainConfig(
                out=out, data=(str(data),), encoder=encoder, lm=lm, mapper=mapper,
                prefix_batch_size=batch, prefix_steps=steps, checkpoint_every=10**9,
                feature_cache=root / "features", bundle=out / "pipeline", val_fraction=0,
            )  # fmt: skip
            tic = time.perf_counter()
            trained = train(config)
            rate, done = steady_rate(out / "log.jsonl")
            entry = {
                "batch_size": batch,
                "steps": done,
                "samples_per_s": rate,
                "wall_s": time.perf_counter() - tic,
                "mapper_params_m": sum(p.numel() for p in trained.mapper.parameters()) / 1e6,
            }
            if device == "cuda":
                entry["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            results["configs"][name] = entry
            del trained
    feature_hours = COCO_IMAGES / results["features_images_per_s"] / 3600
    results["coco_estimate"] = {
        "feature_pass_hours": feature_hours,
        **{
            f"10_epochs_hours {name}": 10 * COCO_CAPTIONS / c["samples_per_s"] / 3600
            for name, c in results["configs"].items()
        },  # fmt: skip
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_prefix", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="toy models: tests the harness")
    parser.add_argument("--steps", type=int, help="steps per configuration")
    parser.add_argument("--images", type=int, help="synthetic images in the dataset")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (6 if args.tiny else 200 if device == "cuda" else 20)
    images = args.images or (24 if args.tiny else 2048 if device == "cuda" else 128)
    results = run(device, args.tiny, steps, images)
    print(f"\nprefix training, {device}: {results['features_images_per_s']:.0f} images/s "
          f"into the feature cache")  # fmt: skip
    print(f"{'config':<18}{'batch':>6}{'samples/s':>11}{'GPU GB':>8}")
    for name, c in results["configs"].items():
        memory = f"{c['peak_gpu_memory_gb']:.1f}" if "peak_gpu_memory_gb" in c else "-"
        print(f"{name:<18}{c['batch_size']:>6}{c['samples_per_s']:>11.0f}{memory:>8}")
    for name, hours in results["coco_estimate"].items():
        print(f"COCO {name}: {hours:.2f} h")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
