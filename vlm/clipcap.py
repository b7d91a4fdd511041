"""ClipCap's published checkpoints, loaded as they are.

A ClipCap checkpoint (rmokady/CLIP_prefix_caption) is a plain `torch.save(model.state_dict())`
of `ClipCaptionModel`: the GPT-2 under `gpt.*` (fine-tuned in `coco_weights.pt`, stock in the
frozen-LM transformer checkpoint) and the mapper under `clip_project.*`. The mapper's kind,
prefix length, clip length and depth are all read off the tensors' names and shapes.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import Parts, PipelineConfig
from .encoder import Encoder
from .errors import InputError
from .mapper import PrefixMapper
from .tasks import CAPTION_TASKS

# GPT-2's causal-mask buffers, saved by old transformers, are not parameters any more.
_STALE_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .pt/.bin state dict without executing any code it may carry."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{os.fspath(path)} is not a plain tensor checkpoint; refusing to unpickle it "
            f"(it could run code): {str(error).splitlines()[0]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{os.fspath(path)} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def mapper_from_state(
    state: dict[str, torch.Tensor], lm_dim: int, normalize_input: bool
) -> PrefixMapper:
    """Build the PrefixMapper whose config matches ClipCap `clip_project.*` tensors."""
    if "model.0.weight" in state:
        hidden, clip_dim = state["model.0.weight"].shape
        prefix_length = state["model.2.weight"].shape[0] // lm_dim
        mapper = PrefixMapper(
            "mlp", clip_dim, lm_dim, prefix_length, hidden_dim=hidden,
            normalize_input=normalize_input,
        )  # fmt: skip
    elif "linear.weight" in state:
        prefix_length, _ = state["prefix_const"].shape
        out, clip_dim = state["linear.weight"].shape
        layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.layers.")}
        hidden = state["transformer.layers.0.mlp.fc1.weight"].shape[0]
        mapper = PrefixMapper(
            "transformer", clip_dim, lm_dim, prefix_length, clip_length=out // lm_dim,
            num_layers=len(layers), mlp_ratio=hidden / lm_dim, normalize_input=normalize_input,
        )  # fmt: skip
    else:
        raise InputError("no ClipCap mapper (clip_project.*) in this checkpoint")
    mapper.load_state_dict(state)
    return mapper


def read_clipcap(
    checkpoint: str | os.PathLike,
    *,
    encoder: dict | None = None,
    lm: str = "openai-community/gpt2",
    normalize_input: bool | None = None,
    name: str = "clipcap",
    tasks: Iterable[str] = CAPTION_TASKS,
    precision: str = "fp32",
) -> Parts:
    """A pipeline's parts from a ClipCap checkpoint file (`Pipeline.from_clipcap` loads it).

    `encoder` is the open_clip spec (default ViT-B-32 with OpenAI's weights, QuickGELU as
    CLIP had); `lm` gives GPT-2's config and tokenizer (its weights come from the file when
    it holds `gpt.*`). `normalize_input` defaults to ClipCap's own choice: raw embeddings for
    the MLP mapper (predict.py), L2-normalised ones for the transformer (its notebook).

    `tasks`: ClipCap was trained on captions only, so by default it captions (and its CLIP
    ranks labels, searches and explains) but does not answer. `precision="fp32"` decodes as
    published (no autocast); "mixed" opts into bf16/fp16 autocast on a GPU."""
    state = load_state_dict(checkpoint)
    gpt = {k[len("gpt.") :]: v for k, v in state.items() if k.startswith("gpt.")}
    gpt = {k: v for k, v in gpt.items() if not _STALE_BUFFER.search(k)}
    mapper_state = {
        k[len("clip_project.") :]: v for k, v in state.items() if k.startswith("clip_project.")
    }
    encoder_spec = encoder or {"model": "ViT-B-32-quickgelu", "pretrained": "openai"}
    image_encoder = Encoder.load(encoder_spec)
    if gpt:
        language_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm))
        missing, unexpected = language_model.load_state_dict(gpt, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embeddings
        if missing or unexpected:
            raise InputError(
                f"GPT weights do not fit {lm}: missing {missing}, unexpected {unexpected}"
            )
        language_model.tie_weights()
    else:
        language_model = AutoModelForCausalLM.from_pretrained(lm)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    if normalize_input is None:
        normalize_input = "linear.weight" in mapper_state
    mapper = mapper_from_state(mapper_state, language_model.config.hidden_size, normalize_input)
    config = PipelineConfig(
        encoder=encoder_spec, mapper=mapper.config, lm=lm, name=name, stop=["."],
        tasks=sorted(tasks), precision=precision,
    )  # fmt: skip
    return Parts(image_encoder, language_model, tokenizer, mapper, config)
