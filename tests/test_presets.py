"""The preset registry: what each model needs from the hub, which encoder it names, what it
was trained for, and which model a machine serves by default (all offline, with fakes)."""

from __future__ import annotations

import socket
import warnings
from unittest import mock

import open_clip
import open_clip.factory
import pytest
from fake_hub import add_files, use_cache
from open_clip.transformer import QuickGELU

from vlm import presets
from vlm.presets import PRESETS, choose_default_model, models_for_task, runnable_presets
from vlm.tasks import IMAGE_TASKS, UnsupportedTaskError, task_set

COCO = PRESETS["clipcap-coco"]


def open_clip_requests(model: str, pretrained: str) -> list[tuple[str, str]]:
    """The (repo, file) downloads open_clip itself asks for, in order, to build the model."""
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename))
        return "/nonexistent/weights"

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    with mock.patch("open_clip.pretrained.hf_hub_download", fake_download):
        open_clip.pretrained.download_pretrained(cfg)
    return requests


def clipcap_coco_cache(monkeypatch, tmp_path, with_encoder: bool = True):
    cache = use_cache(monkeypatch, tmp_path)
    add_files(cache, COCO.repo_id, {COCO.filename: b"weights"})
    add_files(cache, "openai-community/gpt2", {f: b"{}" for _, f in presets._GPT2_FILES})
    if with_encoder:  # exactly what open_clip fetches (first choice: it found it there)
        repo, filename = open_clip_requests(**COCO.clipcap["encoder"])[0]
        add_files(cache, repo, {filename: b"weights"})
    return cache


def test_clipcap_coco_is_cached_after_open_clip_downloaded_its_encoder(monkeypatch, tmp_path):
    requests = open_clip_requests(**COCO.clipcap["encoder"])
    assert requests[0] == ("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")
    clipcap_coco_cache(monkeypatch, tmp_path)
    assert COCO.is_cached()
    assert "clipcap-coco" in presets.available_presets()


def test_clipcap_coco_without_its_encoder_weights_is_not_cached(monkeypatch, tmp_path):
    clipcap_coco_cache(monkeypatch, tmp_path, with_encoder=False)
    assert not COCO.is_cached()


def test_the_encoder_bin_fallback_also_counts(monkeypatch, tmp_path):
    cache = clipcap_coco_cache(monkeypatch, tmp_path, with_encoder=False)
    add_files(cache, "timm/vit_base_patch32_clip_224.openai", {"open_clip_pytorch_model.bin": b""})
    assert COCO.is_cached()


@pytest.mark.parametrize("name", ["clipcap-coco", "clipcap-coco-transformer"])
def test_clipcap_encoders_build_with_quickgelu_and_no_warning(name):
    """OpenAI's CLIPs were trained with QuickGELU: the open_clip name must switch it on, or
    open_clip warns and builds the wrong activation (the weights load, the features drift).
    Built with open_clip's own tag check, the download replaced by random weights."""
    spec = PRESETS[name].clipcap["encoder"]
    with (
        mock.patch.object(open_clip.factory, "download_pretrained", return_value=None),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        model = open_clip.create_model(spec["model"], pretrained=spec["pretrained"])
    assert any(isinstance(m, QuickGELU) for m in model.modules())


def test_presets_declare_what_they_were_trained_for():
    assert PRESETS["shapeworld"].tasks == IMAGE_TASKS
    for name in ("clipcap-coco", "clipcap-coco-transformer"):
        assert PRESETS[name].tasks == {"caption", "classify", "search", "explain"}
    for name in ("blip2-opt-2.7b", "blip2-opt-6.7b"):
        assert PRESETS[name].tasks == {"caption", "answer", "few_shot"}


def test_unknown_task_names_are_refused():
    with pytest.raises(ValueError, match="unknown tasks"):
        task_set(["caption", "dance"])


def test_unsupported_task_error_names_the_task_and_who_can():
    error = UnsupportedTaskError("answer", "clipcap-coco", ["blip2-opt-2.7b", "shapeworld"])
    assert isinstance(error, ValueError)
    assert "clipcap-coco was not trained to answer questions" in str(error)
    assert "blip2-opt-2.7b, shapeworld" in str(error)


def test_a_task_routes_to_a_runnable_model_trained_for_it():
    runnable = ["blip2-opt-2.7b", "clipcap-coco", "shapeworld"]
    assert models_for_task("classify", runnable) == ["clipcap-coco", "shapeworld"]
    assert models_for_task("answer", runnable) == ["blip2-opt-2.7b", "shapeworld"]
    assert models_for_task("few_shot", ["clipcap-coco"]) == []


# ---------------------------------------------------------------------------- defaults


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine with an empty hub cache whose GPU and hub answer as a test says."""
    use_cache(monkeypatch, tmp_path)
    state = {"gpu": False, "hub": False, "asked": 0}

    def reachable(timeout=2.0):
        state["asked"] += 1
        return state["hub"]

    monkeypatch.setattr(presets, "has_gpu", lambda: state["gpu"])
    monkeypatch.setattr(presets, "hub_reachable", reachable)
    return state


def test_default_is_blip2_with_a_gpu_and_the_hub(machine):
    machine.update(gpu=True, hub=True)
    name, why = choose_default_model()
    assert name == "blip2-opt-2.7b" and "GPU" in why


def test_default_is_clipcap_on_a_cpu_with_the_hub(machine):
    machine.update(gpu=False, hub=True)
    name, why = choose_default_model()
    assert name == "clipcap-coco" and "no GPU" in why


def test_default_is_shapeworld_offline(machine):
    machine.update(gpu=True, hub=False)
    name, why = choose_default_model()
    assert name == "shapeworld" and ("not reachable" in why or "HF_HUB_OFFLINE" in why)


def test_default_uses_the_cache_without_asking_the_hub(machine, monkeypatch, tmp_path):
    clipcap_coco_cache(monkeypatch, tmp_path)
    assert choose_default_model()[0] == "clipcap-coco"
    assert machine["asked"] == 0


def test_offline_never_opens_a_connection(monkeypatch, tmp_path):
    use_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("opened a connection while offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert choose_default_model()[0] == "shapeworld"
    assert runnable_presets() == ["shapeworld"]


def test_runnable_presets_follow_the_gpu_and_the_hub(machine, monkeypatch):
    monkeypatch.delenv("VLM_CLIPCAP_TRANSFORMER_WEIGHTS", raising=False)
    machine.update(gpu=False, hub=False)
    assert runnable_presets() == ["shapeworld"]
    machine.update(hub=True)
    assert runnable_presets() == ["clipcap-coco", "shapeworld"]
    machine.update(gpu=True)
    assert runnable_presets() == ["blip2-opt-2.7b", "blip2-opt-6.7b", "clipcap-coco", "shapeworld"]
