"""vlm.device: where models run and in which precision, decided without a GPU (CUDA's answers
are monkeypatched)."""

from __future__ import annotations

import pytest
import torch

from vlm import device


@pytest.fixture
def gpu(monkeypatch):
    """A machine whose CUDA answers as set: `gpu(bf16=True)`."""

    def make(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    monkeypatch.delenv("VLM_DEVICE", raising=False)
    monkeypatch.delenv("VLM_PRECISION", raising=False)
    return make


def test_default_device_is_cuda_when_present_else_cpu(gpu, monkeypatch):
    gpu()
    assert device.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.default_device() == torch.device("cpu")


def test_vlm_device_overrides_the_choice(gpu, monkeypatch):
    gpu()
    monkeypatch.setenv("VLM_DEVICE", "cpu")
    assert device.default_device() == torch.device("cpu")
    monkeypatch.setenv("VLM_DEVICE", "cuda:1")
    assert device.default_device() == torch.device("cuda", 1)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpus_get_bf16_where_supported_else_fp16(gpu, bf16, expected):
    gpu(bf16=bf16)
    assert device.autocast_dtype(torch.device("cuda")) is expected
    assert device.autocast_dtype(torch.device("cuda", 0)) is expected


def test_cpu_and_vlm_precision_fp32_get_full_precision(gpu, monkeypatch):
    gpu(bf16=True)
    assert device.autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setenv("VLM_PRECISION", "FP32")
    assert device.autocast_dtype(torch.device("cuda")) is None
    monkeypatch.setenv("VLM_PRECISION", "auto")
    assert device.autocast_dtype(torch.device("cuda")) is torch.bfloat16


def test_autocast_is_a_no_op_on_cpu_and_casts_on_gpu(gpu, monkeypatch):
    gpu(bf16=False)
    assert not isinstance(device.autocast(torch.device("cpu")), torch.autocast)
    contexts = []
    monkeypatch.setattr(torch, "autocast", lambda **kw: contexts.append(kw) or "context")
    assert device.autocast(torch.device("cuda")) == "context"
    assert contexts == [{"device_type": "cuda", "dtype": torch.float16}]


def test_available_cores_follows_the_affinity(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert device.available_cores() == 3
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(), raising=False)
    assert device.available_cores() == 1  # never zero
