"""BLIP-2 (Li et al., 2023) as a visual-prefix pipeline.

BLIP-2 is this project's method at scale: a frozen image encoder, a learned mapper (the
Q-Former: 32 learned queries cross-attend to the image's hidden states, then a linear
projection into the LM's embedding space) and a frozen OPT reading the result as a soft
prompt. The published weights (transformers' `Blip2ForConditionalGeneration` layout) are split
into the pipeline's three roles, so captions, answers and few-shot continuations run through
the same `Pipeline` code as ClipCap's: prefix embeddings + the LM's own `generate`.

- encoder: `Blip2ImageEncoder` (vision tower + BLIP-2's image processor); mapper input
  "hidden_states"
- mapper: `QFormerMapper` (query tokens + Q-Former + language projection)
- LM: the model's `language_model`, with BLIP-2's prompt format: after the query outputs,
  OPT's BOS token, then the text (`"Question: {question} Answer:"` for questions)

BLIP-2 has no contrastive text tower: zero-shot labels, search and heatmaps are not its tasks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .config import Parts, PipelineConfig
from .device import default_device, requested_precision
from .tasks import PREFIX_LM_TASKS, UnsupportedTaskError

MODEL_TYPE = "blip-2"
HF_CONFIG = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# besides the weights, Blip2Processor.from_pretrained reads the tokenizer's config and the
# image processor's: preprocessor_config.json (older repos) or processor_config.json (newer)
TOKENIZER_CONFIG = "tokenizer_config.json"
IMAGE_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")


def is_blip2_config(config: dict) -> bool:
    """Whether a config.json is transformers' BLIP-2 (not a vlm pipeline's)."""
    return config.get("model_type") == MODEL_TYPE


def weights_dtype(device: torch.device) -> torch.dtype:
    """The dtype BLIP-2's weights load in: fp16 on a GPU, as its authors ran the frozen ViT and
    OPT (VLM_PRECISION=bf16 or fp32 asks for another, see `vlm.device`), fp32 on a CPU. The
    Q-Former stays in fp32 either way (transformers keeps it there)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    requested = requested_precision()
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(requested, torch.float16)


class Blip2ImageEncoder:
    """The frozen vision tower and BLIP-2's own image processor (resize, normalise).
    `capable`: the models to name when asked for what only a text tower does."""

    def __init__(self, vision_model: nn.Module, image_processor, spec: dict, capable=()):
        self.model = vision_model.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.spec = spec
        self.capable = list(capable)
        self.is_local = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_side(self) -> int:
        return int(self.model.config.image_size)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden states [B, N, D]: what the Q-Former reads."""
        return self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state

    def _no_text_tower(self, *args, **kwargs):
        raise UnsupportedTaskError("classify", self.spec.get("model", "BLIP-2"), self.capable)

    # the contrastive encoder's API, which BLIP-2 lacks: a clear error, not an AttributeError
    encode_text = encode_images = encode_pixels = _no_text_tower


class QFormerMapper(nn.Module):
    """BLIP-2's prefix mapper: learned queries read the image through the Q-Former, and a
    linear projection puts the result in the LM's embedding space ([B, num_queries, d_lm])."""

    input = "hidden_states"

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, projection: nn.Linear):
        super().__init__()
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = projection

    @property
    def prefix_length(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def config(self) -> dict:
        return {"kind": "qformer", "prefix_length": self.prefix_length,
                "lm_dim": self.language_projection.out_features}  # fmt: skip

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask, return_dict=True,
        ).last_hidden_state  # fmt: skip
        # the Q-Former runs in fp32; its output goes back to the vision tower's dtype, as in
        # Blip2ForConditionalGeneration.generate
        return self.language_projection(out.to(image_embeds.dtype))


def read_blip2(
    name_or_path: str | os.PathLike,
    *,
    device=None,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    capable=(),
) -> Parts:
    """A pipeline's parts from a BLIP-2 hub repo or a folder saved by
    `Blip2ForConditionalGeneration.save_pretrained` + `Blip2Processor.save_pretrained`
    (`Pipeline.from_pretrained` loads it). Weights load from safetensors only; on a GPU in
    fp16 with accelerate's `device_map="auto"` (parts that do not fit the GPU stay in CPU
    memory). `capable`: see `Blip2ImageEncoder`."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    device = torch.device(device) if device is not None else default_device()
    source = os.fspath(name_or_path)
    placement = "auto" if device.type == "cuda" else {"": device}
    model = Blip2ForConditionalGeneration.from_pretrained(
        source, dtype=dtype or weights_dtype(device), use_safetensors=True, device_map=placement
    ).eval()
    model.requires_grad_(False)
    processor = Blip2Processor.from_pretrained(source)
    spec = {"model": source}
    encoder = Blip2ImageEncoder(model.vision_model, processor.image_processor, spec, capable)
    encoder.blip2, encoder.processor = model, processor  # what save_blip2 writes back
    mapper = QFormerMapper(model.query_tokens, model.qformer, model.language_projection)
    config = PipelineConfig(
        encoder={"model": source},
        mapper=mapper.config,
        lm=source,
        name=name or Path(source).name,
        caption_prompt="",
        question_template="Question: {question} Answer:",
        tasks=sorted(PREFIX_LM_TASKS),
        bos_after_image=True,
        family="blip2",
    )
    return Parts(encoder, model.language_model, processor.tokenizer, mapper, config)


def save_blip2(pipeline, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the published layout back (model + processor), which `read_blip2` reads."""
    model, processor = pipeline.encoder.blip2, pipeline.encoder.processor
    state = None
    if dtype is not None:
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state)
    processor.save_pretrained(directory)


def is_cached(repo_id: str) -> bool:
    """Whether a BLIP-2 hub repo's config, processor and every safetensors shard are in the
    local Hugging Face cache (no network asked)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> str | None:
        path = try_to_load_from_cache(repo_id, filename)
        return path if isinstance(path, str) else None

    if not (cached(HF_CONFIG) and cached(TOKENIZER_CONFIG)):
        return False
    if not any(cached(f) for f in IMAGE_PROCESSOR_CONFIGS):
        return False
    index = cached(INDEX_NAME)
    if index is None:
        return cached(SINGLE_WEIGHTS) is not None
    shards = set(json.loads(Path(index).read_text())["weight_map"].values())
    return all(cached(shard) for shard in shards)
