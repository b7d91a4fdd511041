"""The one place that decides where models run and in which precision."""

from __future__ import annotations

import contextlib
import os

import torch


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it, fp16 on older GPUs, none (fp32) on CPU or when
    VLM_PRECISION=fp32 asks for full precision."""
    if device.type != "cuda" or os.environ.get("VLM_PRECISION", "auto").lower() == "fp32":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference on `device` (a no-op on CPU)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
