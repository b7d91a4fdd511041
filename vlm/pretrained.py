"""Where a model's weights live, and how each published form reads into a pipeline's parts.

One place for every way a model is named: a preset (`vlm.presets`), a folder written by
`Pipeline.save_pretrained`, a BLIP-2 folder or hub id (transformers' layout), a hub id of a
saved pipeline, or a ClipCap checkpoint file (through its preset). `Pipeline.from_pretrained`
builds the pipeline from the parts read here; nothing here imports `vlm.pipeline`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from .blip2 import is_blip2_config, read_blip2
from .calibration import Calibration
from .clipcap import read_clipcap
from .config import CONFIG_NAME, MAPPER_WEIGHTS, Parts, PipelineConfig
from .encoder import Encoder
from .errors import InputError, ModelLoadError, VLMError, one_line
from .familiarity import FamiliarityProfile
from .mapper import PrefixMapper
from .presets import PRESETS, Preset, models_for


def load_parts(name_or_path: str | os.PathLike, device=None) -> Parts:
    """The parts of a preset name, a saved folder (vlm's or BLIP-2's) or a hub repo id.
    Raises ModelLoadError, saying why in one line, where they cannot be read."""
    name = str(name_or_path)
    try:
        return _load_parts(name, device)
    except VLMError:
        raise
    # not on disk nor downloadable (OSError), a malformed file (ValueError, SafetensorError),
    # weights that do not fit their architecture (RuntimeError, from load_state_dict)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(name, one_line(error)) from error


def _load_parts(name: str, device) -> Parts:
    if name in PRESETS:
        return preset_parts(PRESETS[name], device)
    folder = Path(name).expanduser()
    if not folder.is_dir():  # a hub repo: its config first, to fetch only what it needs
        data = json.loads(Path(hf_hub_download(name, CONFIG_NAME)).read_text())
        if is_blip2_config(data):
            return _blip2(name, device)
        folder = Path(snapshot_download(name))
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not a saved vlm pipeline")
    data = json.loads((folder / CONFIG_NAME).read_text())
    if is_blip2_config(data):
        return _blip2(folder, device)
    return folder_parts(folder, PipelineConfig.from_dict(data))


class ModelRefused(InputError):
    """A model folder a server will not load for a request; the message says why."""


def check_confined(folder: str | os.PathLike) -> None:
    """Refuse (ModelRefused) a model folder whose `config.json` would make loading it read
    or fetch anything outside it: the LM must be a subfolder, a `local-dir:` encoder and a
    weights file must lie inside (no absolute path, no `..`, no symlink out), and the
    encoder's weights must be a file there or one of open_clip's published tags for its
    model (a fixed download, as a preset's). No hub id is taken from such a folder. A BLIP-2
    folder (transformers' layout) names no paths."""
    root = Path(folder).resolve()
    try:
        data = json.loads((root / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise ModelRefused(f"{root.name}: no readable {CONFIG_NAME} ({error})") from None
    if not isinstance(data, dict):
        raise ModelRefused(f"{root.name}: {CONFIG_NAME} is not an object")
    if is_blip2_config(data):
        return
    encoder = data.get("encoder") if isinstance(data.get("encoder"), dict) else {}
    model = str(encoder.get("model", ""))

    def inside(value, what: str, kind: str) -> None:
        text = str(value or "")
        path = Path(text)
        target = (root / path).resolve()
        exists = target.is_dir() if kind == "folder" else target.exists()
        if not text or path.is_absolute() or ".." in path.parts:
            raise ModelRefused(f"{root.name}: its {what} {text!r} is not a path inside it")
        if not (target.is_relative_to(root) and exists):
            raise ModelRefused(f"{root.name}: its {what} {text!r} is not a {kind} inside it")

    inside(data.get("lm", "lm"), "LM", "folder")
    if model.startswith("local-dir:"):
        inside(model.removeprefix("local-dir:"), "encoder", "folder")
    elif model.startswith("hf-hub:") or model not in open_clip.list_models():
        raise ModelRefused(f"{root.name}: its encoder {model!r} is not open_clip's nor inside it")
    pretrained = encoder.get("pretrained")
    if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        inside(pretrained, "encoder weights", "file")


def folder_parts(folder: Path, config: PipelineConfig) -> Parts:
    """A folder saved by `Pipeline.save_pretrained`: its encoder, LM, tokenizer and mapper."""
    encoder = Encoder.load(config.encoder, root=folder)
    lm_source = folder / config.lm if (folder / config.lm).is_dir() else config.lm
    lm = AutoModelForCausalLM.from_pretrained(lm_source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_source)
    mapper = PrefixMapper.from_config(config.mapper, f"{CONFIG_NAME} mapper")
    mapper.load_state_dict(load_file(folder / MAPPER_WEIGHTS))
    return Parts(
        encoder,
        lm,
        tokenizer,
        mapper,
        config,
        FamiliarityProfile.load(folder),
        Calibration.load(folder),
    )


def preset_parts(preset: Preset, device=None) -> Parts:
    """A preset's parts: its bundled folder, its BLIP-2 hub repo or its ClipCap checkpoint."""
    if preset.folder is not None:
        return load_parts(preset.folder, device)
    if preset.blip2:
        return _blip2(preset.repo_id, device, name=preset.name)
    options = dict(name=preset.name, tasks=preset.tasks, **preset.clipcap)
    return clipcap_parts(preset.checkpoint(), **options)


def clipcap_parts(checkpoint: str | os.PathLike, **options) -> Parts:
    """A ClipCap checkpoint file's parts, read as published (see `vlm.clipcap.read_clipcap`
    for the `options`)."""
    return read_clipcap(checkpoint, **options)


def _blip2(source, device, name: str | None = None) -> Parts:
    # BLIP-2 has no text tower: its encoder names the models that can rank labels instead
    return read_blip2(source, device=device, name=name, capable=models_for("classify"))
