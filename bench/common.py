"""What every benchmark shares: sizes, the models, test images, a timer, the result rows.

The models are full-size architectures with random weights, built offline: open_clip's
ViT-B-32 and GPT-2 124M (`GPT2Config()`), with a ClipCap MLP mapper (512 -> 10 x 768)
between them. GPT-2's own tokenizer files are not available offline, so a small byte-level
BPE (1,000 tokens) is trained on caption-like text; the LM keeps GPT-2's 50,257-row
embedding and head so that every step costs what it costs with the real GPT-2. Ids the BPE
does not know decode to nothing (the `tokenizers` decoder skips them; `_check_decoding`
makes sure), and output tokens are compared as ids, never as decoded text.

`--tiny` (for the test suite) swaps in a tiny CLIP and GPT-2 and shrinks every size.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
SEED = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: str  # "full": ViT-B-32 + GPT-2 124M; "tiny": the test suite's toy sizes
    image_size: tuple[int, int]  # (width, height) of the generated photos
    repeats: int  # timed repeats per measurement (the fastest counts)
    new_tokens: int  # tokens generated per caption (fixed: random weights never stop)
    caption_images: int  # images captioned by ours in batches of 16
    reference_images: int  # of those, how many the reference captions one by one
    zeroshot_images: int
    labels: int  # ImageNet class names to classify against
    templates: int | None  # zero-shot templates; None: OpenAI's 80
    index_images: int
    index_batch: int
    search_sizes: tuple[int, ...]  # database sizes for the vector search benchmark
    search_queries: int
    hnsw_up_to: int  # also build HNSW32 for databases up to this size (slow to build)


BENCH_SIZES = {
    "tiny": Sizes(
        model="tiny", image_size=(160, 120), repeats=1, new_tokens=8, caption_images=4,
        reference_images=2, zeroshot_images=4, labels=100, templates=1, index_images=8,
        index_batch=4, search_sizes=(5_000,), search_queries=50, hnsw_up_to=5_000,
    ),
    "quick": Sizes(
        model="full", image_size=(640, 480), repeats=1, new_tokens=20, caption_images=16,
        reference_images=4, zeroshot_images=16, labels=1000, templates=1, index_images=64,
        index_batch=16, search_sizes=(100_000,), search_queries=100, hnsw_up_to=0,
    ),
    "full": Sizes(
        model="full", image_size=(640, 480), repeats=3, new_tokens=67, caption_images=32,
        reference_images=16, zeroshot_images=64, labels=1000, templates=None, index_images=256,
        index_batch=32, search_sizes=(100_000, 1_000_000), search_queries=200,
        hnsw_up_to=100_000,
    ),
}  # fmt: skip


@dataclasses.dataclass
class Metric:
    """One row of the table: ours against a reference measured in the same run."""

    name: str
    ours: float | bool | None
    reference: float | bool | None
    unit: str  # of ours and reference
    ratio: float | None = None
    ratio_is: str = ""  # what the ratio means, e.g. "speed-up: reference time / ours"
    target: str = ""  # e.g. ">= 2"
    met: bool | None = None
    note: str = ""


def ratio_metric(
    name: str,
    ours: float,
    reference: float,
    unit: str,
    ratio: float,
    ratio_is: str,
    target: tuple[str, float] | None = None,
    note: str = "",
) -> Metric:
    """A metric whose ratio is checked against `target`: (">=" or "<=", bound)."""
    met, text = None, ""
    if target is not None:
        op, bound = target
        met = bool(ratio >= bound) if op == ">=" else bool(ratio <= bound)
        text = f"{op} {bound:g}"
    return Metric(name, ours, reference, unit, ratio, ratio_is, text, met, note)


class Context:
    """The run's options plus everything built once and shared by the benchmarks."""

    def __init__(self, mode: str, device: str):
        self.mode = mode
        self.sizes = BENCH_SIZES[mode]
        self.device = torch.device(device)
        self._tmp = tempfile.TemporaryDirectory(prefix="vlm-bench-")
        self.tmp = Path(self._tmp.name)
        self.build_seconds: float | None = None  # building the models, not in any timing

    def close(self) -> None:
        self._tmp.cleanup()

    @functools.cached_property
    def pipeline(self):
        seed_everything()
        start = time.perf_counter()
        build = tiny_pipeline if self.sizes.model == "tiny" else full_pipeline
        pipeline = build(self.device)
        self.build_seconds = time.perf_counter() - start
        return pipeline

    def images(self, n: int, offset: int = 0) -> list[Image.Image]:
        """n deterministic photo-like RGB images (the same n for the same offset)."""
        return [photo(SEED * 1_000_003 + offset + i, self.sizes.image_size) for i in range(n)]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], T], repeats: int | None = None) -> tuple[float, T]:
        """Seconds of the fastest of `repeats` calls of fn (the least disturbed one), and
        what the last call returned."""
        best = float("inf")
        for _ in range(repeats or self.sizes.repeats):
            self.sync()
            start = time.perf_counter()
            result = fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best, result


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- models


def caption_corpus() -> list[str]:
    """Caption-like sentences about ImageNet's classes, to train the benchmark's BPE on."""
    import open_clip

    rng = random.Random(SEED)
    frames = ["a photo of a {}.", "a {} on a table.", "a close-up of the {}.", "two {}s."]
    return [rng.choice(frames).format(c) for c in open_clip.IMAGENET_CLASSNAMES for _ in (0, 1)]


def _tokenizer(lm_vocab: int):
    from vlm.factory import train_tokenizer

    tokenizer = train_tokenizer(caption_corpus(), vocab_size=1000)
    _check_decoding(tokenizer, lm_vocab)
    return tokenizer


def _check_decoding(tokenizer, lm_vocab: int) -> None:
    """Random weights emit any of the LM's ids; those the BPE lacks must decode to nothing."""
    unknown = [i for i in (len(tokenizer), lm_vocab - 1) if i >= len(tokenizer)]
    if tokenizer.decode(unknown) != "" or tokenizer.batch_decode([unknown]) != [""]:
        raise RuntimeError("the benchmark tokenizer does not skip unknown ids")


def full_pipeline(device):
    """open_clip ViT-B-32 + GPT-2 124M + ClipCap's MLP mapper, all random weights."""
    import open_clip
    from transformers import GPT2Config, GPT2LMHeadModel

    from vlm.encoder import Encoder
    from vlm.mapper import PrefixMapper
    from vlm.pipeline import Pipeline, PipelineConfig

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.model_cfg = open_clip.get_model_config("ViT-B-32")  # lets save_pretrained write it
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    encoder = Encoder(model, preprocess, tokenizer, {"model": "local-dir:encoder"})
    lm = GPT2LMHeadModel(GPT2Config())
    mapper = PrefixMapper("mlp", 512, 768, 10)
    config = PipelineConfig(encoder=encoder.spec, mapper=mapper.config, stop=["."])
    return Pipeline(encoder, lm, _tokenizer(lm.config.vocab_size), mapper, config, device)


def tiny_pipeline(device):
    """The same parts at toy sizes (the test suite's), still random weights."""
    from vlm.factory import build_encoder, build_lm, clip_config
    from vlm.mapper import PrefixMapper
    from vlm.pipeline import Pipeline, PipelineConfig

    encoder = build_encoder(clip_config())
    tokenizer = _tokenizer(1000)
    lm = build_lm(tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=64)
    mapper = PrefixMapper("mlp", encoder.embed_dim, 64, 10)
    config = PipelineConfig(encoder=encoder.spec, mapper=mapper.config, stop=["."])
    return Pipeline(encoder, lm, tokenizer, mapper, config, device)


# ---------------------------------------------------------------------- images


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image: a smooth random background, a few soft shapes, sensor noise.

    Smooth content with fine noise compresses like a real photo (a 640x480 JPEG of ~60 KB),
    so decoding costs what it costs on real pictures."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(height // 12, height // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=color)
    image = image.filter(ImageFilter.GaussianBlur(radius=2))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, images: list[Image.Image]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"photo-{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


# ---------------------------------------------------------------------- the machine


def machine_info(device: torch.device) -> dict:
    import faiss
    import open_clip
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),  # fmt: skip
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "device": str(device),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
