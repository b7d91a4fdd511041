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

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from .blip2 import is_blip2_config, read_blip2
from .clipcap import read_clipcap
from .config import CONFIG_NAME, MAPPER_WEIGHTS, Parts, PipelineConfig
from .encoder import Encoder
from .mapper import PrefixMapper
from .presets import PRESETS, Preset, models_for


def load_parts(name_or_path: str | os.PathLike, device=None) -> Parts:
    """The parts of a preset name, a saved folder (vlm's or BLIP-2's) or a hub repo id."""
    name = str(name_or_path)
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


def folder_parts(folder: Path, config: PipelineConfig) -> Parts:
    """A folder saved by `Pipeline.save_pretrained`: its encoder, LM, tokenizer and mapper."""
    encoder = Encoder.load(config.encoder, root=folder)
    lm_source = folder / config.lm if (folder / config.lm).is_dir() else config.lm
    lm = AutoModelForCausalLM.from_pretrained(lm_source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_source)
    mapper = PrefixMapper(**config.mapper)
    mapper.load_state_dict(load_file(folder / MAPPER_WEIGHTS))
    return Parts(encoder, lm, tokenizer, mapper, config)


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
