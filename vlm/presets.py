"""The one registry of named models, as data: where each one's weights live, what it was
trained to do, whether this machine has them, and which one it serves by default. Loading
them is `vlm.pretrained`'s work."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from .blip2 import is_cached as blip2_cached
from .paths import ASSETS
from .tasks import CAPTION_TASKS, IMAGE_TASKS, PREFIX_LM_TASKS

SHAPEWORLD_DIR = ASSETS / "shapeworld"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: data that `vlm.pretrained` loads. `folder`: a saved pipeline shipped with
    vlm. `clipcap`: a ClipCap checkpoint file in a hub repo (`repo_id`, `filename`) or a local
    file (`env` names the variable that holds its path), read with
    `vlm.clipcap.read_clipcap(**clipcap)`. `blip2`: a hub repo in transformers'
    Blip2ForConditionalGeneration layout (`repo_id`).

    `tasks` are what its weights were trained for (see `vlm.tasks`); `needs_gpu` marks a model
    too slow or too big to serve from a CPU."""

    name: str
    description: str
    tasks: frozenset[str] = IMAGE_TASKS
    folder: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    env: str | None = None
    clipcap: dict = dataclasses.field(default_factory=dict)
    blip2: bool = False
    needs_gpu: bool = False
    # the (repo, file) pairs it needs from the hub besides its encoder's weights
    hub_files: tuple[tuple[str, str], ...] = ()

    def checkpoint(self) -> str:
        if self.env:
            path = os.environ.get(self.env)
            if not path or not Path(path).is_file():
                raise FileNotFoundError(
                    f"{self.name}: set {self.env} to the path of its checkpoint file "
                    f"(it is published on Google Drive, not on the Hugging Face hub)"
                )
            return path
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, self.filename)

    def is_cached(self) -> bool:
        """True when everything it needs is already on this machine (no network needed)."""
        if self.folder is not None:
            return (self.folder / "config.json").is_file()
        if self.blip2:
            return blip2_cached(self.repo_id)
        if self.env and not (os.environ.get(self.env) and Path(os.environ[self.env]).is_file()):
            return False
        encoder = self.clipcap.get("encoder")
        return all(_in_cache(repo, file) for repo, file in self.hub_files) and (
            encoder is None or encoder_cached(encoder)
        )


def _in_cache(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def encoder_weight_files(model: str, pretrained: str) -> tuple[str, tuple[str, ...]] | None:
    """The hub repo open_clip downloads `model`/`pretrained` from and the files it tries there,
    in its order (open_clip 3.3: `open_clip_model.safetensors` first, the `.bin` as a fallback);
    None for weights that do not come from the hub."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives, get_pretrained_cfg

    hub = get_pretrained_cfg(model, pretrained).get("hf_hub")
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # as open_clip reads it: "org/name/" or "org/name/file"
    filename = filename or HF_WEIGHTS_NAME
    return repo, (*_get_safe_alternatives(filename), filename)


def encoder_cached(spec: dict) -> bool:
    """Whether open_clip can build the encoder `spec` without the network."""
    pretrained = spec.get("pretrained")
    if not pretrained or spec["model"].startswith("local-dir:") or Path(pretrained).is_file():
        return True
    files = encoder_weight_files(spec["model"], pretrained)
    return files is not None and any(_in_cache(files[0], f) for f in files[1])


_GPT2 = "openai-community/gpt2"
# GPT-2's config and tokenizer; ClipCap's COCO checkpoint carries the weights itself
_GPT2_FILES = tuple((_GPT2, f) for f in ("config.json", "vocab.json", "merges.txt"))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="blip2-opt-2.7b",
            description="BLIP-2: a Q-Former reads a frozen EVA ViT-g for a frozen OPT-2.7B "
            "(captions and answers about real photos)",
            tasks=PREFIX_LM_TASKS,
            repo_id="Salesforce/blip2-opt-2.7b",
            blip2=True,
            needs_gpu=True,
        ),
        Preset(
            name="blip2-opt-6.7b",
            description="BLIP-2 with a frozen OPT-6.7B (better answers, twice the memory)",
            tasks=PREFIX_LM_TASKS,
            repo_id="Salesforce/blip2-opt-6.7b",
            blip2=True,
            needs_gpu=True,
        ),
        Preset(
            name="clipcap-coco",
            description="ClipCap (MLP mapper, fine-tuned GPT-2) trained on COCO captions",
            tasks=CAPTION_TASKS,  # its GPT-2 was fine-tuned on captions: it does not answer
            repo_id="akhaliq/CLIP-prefix-captioning-COCO-weights",
            filename="coco_weights.pt",
            clipcap=dict(encoder={"model": "ViT-B-32-quickgelu", "pretrained": "openai"}, lm=_GPT2),
            hub_files=(
                ("akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt"),
                *_GPT2_FILES,
            ),
        ),
        Preset(
            name="clipcap-coco-transformer",
            description="ClipCap (transformer mapper, frozen GPT-2, CLIP RN50x4) on COCO",
            tasks=CAPTION_TASKS,  # the mapper was trained on captions only
            env="VLM_CLIPCAP_TRANSFORMER_WEIGHTS",
            # CLIP RN50x4 was trained with QuickGELU; open_clip's plain "RN50x4" name lacks it
            clipcap=dict(encoder={"model": "RN50x4-quickgelu", "pretrained": "openai"}, lm=_GPT2),
            hub_files=(
                *_GPT2_FILES,
                (_GPT2, "model.safetensors"),
            ),
        ),
        Preset(
            name="shapeworld",
            description="Small CLIP + GPT-2 + prefix mapper trained on ShapeWorld (bundled)",
            folder=SHAPEWORLD_DIR,
        ),
    )
}


def available_presets() -> list[str]:
    """Names of the presets that can load on this machine right now without a download."""
    return [name for name, preset in PRESETS.items() if preset.is_cached()]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (never when offline)."""
    if _offline():
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


Hub = bool | Callable[[], bool] | None


def _ask(hub: Hub) -> bool:
    """Whether the hub answers: `hub` itself, or its answer when it is a way to ask (e.g. one
    probe shared by several questions), or else `hub_reachable()`."""
    if hub is None:
        return hub_reachable()
    return hub() if callable(hub) else hub


def runnable_presets(hub: Hub = None) -> list[str]:
    """The presets this machine can serve: in the cache or downloadable, and on a GPU for the
    models that need one. `hub`: whether the hub is reachable, or how to ask; asked only when
    something is not cached (by default with `hub_reachable`'s short timeout)."""
    gpu = has_gpu()
    fits = [name for name, p in PRESETS.items() if gpu or not p.needs_gpu]
    cached = [name for name in fits if PRESETS[name].is_cached()]
    if len(cached) < len(fits):
        hub = _ask(hub)
    return [
        name
        for name in fits
        if name in cached or (hub and not PRESETS[name].env and PRESETS[name].repo_id)
    ]


def models_for(task: str) -> list[str]:
    """The named models (presets) trained for `task`."""
    return [name for name, preset in PRESETS.items() if task in preset.tasks]


def models_for_task(task: str, runnable: list[str]) -> list[str]:
    """Of the `runnable` presets, those trained for `task`: where to route a task that the
    model in use cannot do (e.g. zero-shot labels for BLIP-2 go to a CLIP-based model)."""
    return [name for name in runnable if task in PRESETS[name].tasks]


def choose_default_model(hub: Hub = None) -> tuple[str, str]:
    """The model to serve when none is named, and why: BLIP-2 on a GPU, ClipCap on a CPU
    (each when cached or the hub answers quickly), else the bundled ShapeWorld model. Never
    waits on the network longer than `hub_reachable`'s timeout, and not at all offline.
    `hub`: as for `runnable_presets`, asked only when the wanted model is not cached."""
    gpu = has_gpu()
    wanted = ["blip2-opt-2.7b", "clipcap-coco"] if gpu else ["clipcap-coco"]
    for name in wanted:
        if PRESETS[name].is_cached():
            return name, f"{name} is in the local Hugging Face cache" + (
                " and a GPU is present" if PRESETS[name].needs_gpu else ""
            )
    if _ask(hub):
        name = wanted[0]
        where = "a GPU is present" if gpu else "there is no GPU, so the CPU-sized model runs"
        return name, f"{name} is downloaded from the Hugging Face hub ({where})"
    reason = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub is not reachable"
    return "shapeworld", f"{wanted[-1]} is not cached and {reason}, so the bundled model runs"
