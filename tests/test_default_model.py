"""Which model the app serves when none is named (vlm.presets.choose_default_model), and its
fallback to the bundled model when the chosen one fails to load. The Hugging Face cache is a
folder the test writes; the hub probe's socket is monkeypatched: nothing touches the network."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

from vlm import Pipeline, presets
from vlm.presets import PRESETS, available_presets, choose_default_model, hub_reachable

COCO = PRESETS["clipcap-coco"]


def cache_files(cache, files, content: bytes = b"weights") -> None:
    """Put (repo, file) pairs in a hub cache folder laid out as huggingface_hub writes it."""
    for repo, name in files:
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / ("0" * 40) / name).write_bytes(content)


def needed_files(preset) -> list[tuple[str, str]]:
    """Everything `preset.is_cached` looks for: its own hub files and its CLIP encoder's
    weights where open_clip downloads them (the first file it tries)."""
    files = list(preset.hub_files)
    encoder = preset.clipcap.get("encoder")
    weights = encoder and presets.encoder_weight_files(encoder["model"], encoder["pretrained"])
    return files + ([(weights[0], weights[1][0])] if weights else [])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, no HF_HUB_OFFLINE, and a probe that records its calls; the hub
    answers when `hub.up` is True."""

    class Hub:
        up = False
        calls: list = []
        cache = tmp_path / "hub"

    def create_connection(address, timeout=None, *args, **kwargs):
        Hub.calls.append((address, timeout))
        if not Hub.up:
            raise TimeoutError("timed out")

        class Connection:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return Connection()

    Hub.cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Hub.cache))
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(COCO_TRANSFORMER_ENV, raising=False)
    return Hub


COCO_TRANSFORMER_ENV = PRESETS["clipcap-coco-transformer"].env


def test_cached_clipcap_is_chosen_without_asking_the_hub(hub):
    cache_files(hub.cache, needed_files(COCO))
    assert COCO.is_cached() and "clipcap-coco" in available_presets()
    name, reason = choose_default_model()
    assert name == "clipcap-coco" and "local Hugging Face cache" in reason
    assert hub.calls == []  # no probe when everything is on disk


def test_a_partly_cached_model_is_not_cached(hub):
    cache_files(hub.cache, COCO.hub_files)  # everything but the CLIP weights
    assert not COCO.is_cached() and "clipcap-coco" not in available_presets()
    cache_files(hub.cache, needed_files(COCO))
    assert COCO.is_cached()
    repo, name = COCO.hub_files[-1]  # now GPT-2's merges.txt goes missing
    next(hub.cache.glob(f"models--{repo.replace('/', '--')}/snapshots/*/{name}")).unlink()
    assert not COCO.is_cached() and "clipcap-coco" not in available_presets()


def test_reachable_hub_chooses_clipcap_after_a_two_second_probe(hub):
    hub.up = True
    name, reason = choose_default_model()
    assert name == "clipcap-coco" and "downloaded from the Hugging Face hub" in reason
    [(address, timeout)] = hub.calls
    assert address == ("huggingface.co", 443) and timeout == 2.0


def test_unreachable_hub_falls_back_to_the_bundled_model(hub):
    name, reason = choose_default_model()
    assert name == "shapeworld" and len(hub.calls) == 1
    assert "not cached" in reason and "not reachable" in reason and "bundled" in reason


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_never_probes_the_hub(hub, monkeypatch, value):
    hub.up = True
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not hub_reachable()
    name, reason = choose_default_model()
    assert name == "shapeworld" and "HF_HUB_OFFLINE is set" in reason and hub.calls == []


def test_the_probe_asks_the_configured_endpoint(hub, monkeypatch):
    hub.up = True
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.org")
    assert hub_reachable(timeout=0.5) and hub.calls == [(("hub.example.org", 443), 0.5)]


def test_a_local_checkpoint_preset_is_cached_when_its_file_exists(hub, monkeypatch, tmp_path):
    preset = PRESETS["clipcap-coco-transformer"]
    assert not preset.is_cached()
    monkeypatch.setenv(preset.env, str(tmp_path / "missing.pt"))
    assert not preset.is_cached()
    with pytest.raises(FileNotFoundError, match=preset.env):
        preset.checkpoint()
    (tmp_path / "transformer.pt").write_bytes(b"weights")
    monkeypatch.setenv(preset.env, str(tmp_path / "transformer.pt"))
    assert not preset.is_cached()  # the file, but not GPT-2 and CLIP RN50x4 in the cache
    cache_files(hub.cache, needed_files(preset))
    assert preset.is_cached() and preset.checkpoint() == str(tmp_path / "transformer.pt")


# ---------------------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def app_module():
    import app

    return app


def test_app_falls_back_to_the_bundled_model_when_the_chosen_one_fails(hub, app_module):
    """The cache holds clipcap-coco's files, but they are damaged: the choice says ClipCap,
    loading it fails, and the app serves the bundled model and says why."""
    cache_files(hub.cache, needed_files(COCO), content=b"not a checkpoint")
    models = app_module.Models(None)
    assert models.default == "shapeworld"
    assert models.reason.startswith("clipcap-coco could not be loaded (")
    assert models.reason.endswith("the bundled model runs")
    assert models.get(None).config.name == "shapeworld"
    assert "clipcap-coco could not be loaded" in models.notice()


def test_a_named_model_that_fails_falls_back_too_but_the_bundled_one_cannot(
    app_module, tmp_path, monkeypatch
):
    models = app_module.Models(str(tmp_path))  # not a saved pipeline
    assert models.default == "shapeworld"
    assert (
        models.reason.startswith(f"{tmp_path} could not be loaded (")
        and "config.json" in models.reason
    )

    def broken(name, device=None):
        raise OSError(f"{name}: disk error")

    monkeypatch.setattr(Pipeline, "from_pretrained", broken)
    with pytest.raises(OSError, match="shapeworld: disk error"):  # nothing left to fall back to
        app_module.Models("shapeworld")


def test_probe_is_not_reached_when_hub_offline_in_the_app(hub, app_module, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = app_module.Models(None)
    assert models.default == "shapeworld" and "HF_HUB_OFFLINE is set" in models.reason
    assert hub.calls == [] and presets.hub_reachable() is False


def test_the_app_asks_the_hub_once_at_start_up(hub, app_module):
    """Choosing the default and listing what can run both need the hub's answer (nothing is
    cached): one probe serves both."""
    models = app_module.Models(None)
    assert models.default == "shapeworld" and "not reachable" in models.reason
    assert models.choices() == ["shapeworld"]
    assert len(hub.calls) == 1
    hub.up, hub.calls[:] = True, []
    assert presets.runnable_presets(hub=lambda: True) == ["clipcap-coco", "shapeworld"]
    assert hub.calls == []  # an answer given is not asked again
