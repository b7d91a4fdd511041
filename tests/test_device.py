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


def test_vlm_precision_has_one_vocabulary_and_refuses_the_rest(monkeypatch):
    """The decode (`mixed`), the encoder's autocast and BLIP-2's weights read the same values;
    a typo is named, not silently read as the default."""
    import torch

    from vlm.blip2 import weights_dtype
    from vlm.device import PRECISION_SETTINGS, decode_dtype, half_dtype, requested_precision
    from vlm.errors import ConfigError

    gpu = torch.device("cuda")  # a device type only: nothing runs on it
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for value in PRECISION_SETTINGS:
        monkeypatch.setenv("VLM_PRECISION", value.upper())
        assert requested_precision() == value
        assert weights_dtype(gpu) == expected.get(value, torch.float16)
        assert weights_dtype(torch.device("cpu")) == torch.float32
        if value in ("bf16", "fp16"):
            assert half_dtype(gpu) == expected[value]
        assert decode_dtype(torch.device("cpu"), "mixed") is None  # nothing to autocast on a CPU
    for typo in ("float16", "bfloat16", "half", "mixd"):
        monkeypatch.setenv("VLM_PRECISION", typo)
        with pytest.raises(ConfigError, match=f"VLM_PRECISION={typo}: choose one of auto, fp32"):
            requested_precision()
