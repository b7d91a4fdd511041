"""The one place that decides where models run and in which precision.

Two precisions, two uses:

- *Encoding* for search, zero-shot labels and heatmaps ranks by cosine similarity: it runs
  under bf16 (or fp16) autocast on a GPU, where it is several times faster.
- *Decoding* (image features -> mapper -> LM -> tokens) writes text, and a published checkpoint
  must write the text it was published with: there no autocast, every weight runs in the
  dtype it was loaded in (fp32 for ClipCap's GPT-2, fp16 for BLIP-2 on a GPU, as its authors
  ran it). Mixed precision for the decode is an opt-in: `precision="mixed"` in a pipeline's
  config or `VLM_PRECISION=mixed`.

`VLM_PRECISION` is read here alone, with one vocabulary (`PRECISION_SETTINGS`): `auto` (the
above), `fp32` (no autocast anywhere, BLIP-2 loaded in fp32), `mixed` (the decode under
autocast too), `bf16` / `fp16` (the 16-bit type GPU work uses: autocast and BLIP-2's weights).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "mixed")  # the decode: weights' own dtype, or autocast (opt-in)
PRECISION_SETTINGS = ("auto", "fp32", "mixed", "bf16", "fp16")  # VLM_PRECISION's values


def default_device() -> torch.device:
    """CUDA when present (unless VLM_DEVICE says otherwise), else CPU."""
    requested = os.environ.get("VLM_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. a container's share), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def requested_precision() -> str:
    """VLM_PRECISION (default "auto"), refused (ConfigError) if not one of PRECISION_SETTINGS."""
    value = os.environ.get("VLM_PRECISION", "").strip().lower() or "auto"
    if value not in PRECISION_SETTINGS:
        raise ConfigError(f"VLM_PRECISION={value}: choose one of {', '.join(PRECISION_SETTINGS)}")
    return value


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit float GPU work uses: VLM_PRECISION's bf16 or fp16, else the one the GPU runs
    best (bf16 where supported, else fp16); None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    chosen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(requested_precision())
    if chosen is not None:
        return chosen
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def training_precision(device: torch.device) -> str:
    """accelerate's `mixed_precision` for training on `device`: "bf16" on a GPU that has it,
    else "no" (fp32; fp16 training would need a loss scaler for little gain here)."""
    return "bf16" if half_dtype(device) == torch.bfloat16 else "no"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The encoder's autocast dtype: 16-bit on GPUs, none (fp32) on CPU or when
    VLM_PRECISION=fp32 asks for full precision."""
    if requested_precision() == "fp32":
        return None
    return half_dtype(device)


def decode_dtype(device: torch.device, precision: str = "fp32") -> torch.dtype | None:
    """The decode's autocast dtype: None (each weight in its loaded dtype, as published) unless
    `precision` (a pipeline's config) or VLM_PRECISION asks for "mixed"."""
    requested = requested_precision()
    if requested == "fp32" or "mixed" not in (precision, requested):
        return None
    return half_dtype(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The encoder's mixed-precision context on `device` (a no-op on CPU)."""
    return autocast_to(device, autocast_dtype(device))


def autocast_to(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; None: no autocast."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
