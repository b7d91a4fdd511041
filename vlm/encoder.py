"""The CLIP-style encoder: an open_clip model with its preprocess and its tokenizer."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from PIL import Image
from safetensors.torch import save_file

from .device import autocast, autocast_to
from .errors import InputError

WEIGHTS_NAME = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


class ImageEncoder(Protocol):
    """The encoder role a Pipeline needs for its visual prefix: `Encoder` (open_clip, which
    also has the text tower for zero-shot, search and heatmaps) or `vlm.blip2.
    Blip2ImageEncoder`. It gives what the mapper's `input` names: `encode_pixels` ("embedding"),
    `encode_tokens` ("tokens") or `encode_hidden_states` ("hidden_states"). The mapper role:
    an nn.Module with `input`, `prefix_length` and `config`, mapping those features to
    [B, prefix_length, d_lm]."""

    model: torch.nn.Module
    spec: dict
    is_local: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def image_side(self) -> int: ...

    def pixels(self, images: list[Image.Image]) -> torch.Tensor: ...


class Encoder:
    """Owns an open_clip model (frozen), its image preprocess and its tokenizer.

    `spec` is how a pipeline's config.json names it: `{"model": "ViT-B-32-quickgelu",
    "pretrained": "openai"}` for a published model, or `{"model": "local-dir:encoder"}` for
    an open_clip folder (open_clip_config.json + weights) inside the pipeline's folder."""

    def __init__(self, model: open_clip.CLIP, preprocess, tokenizer, spec: dict):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        self._visual_lock = threading.Lock()

    @classmethod
    def load(cls, spec: dict, root: Path | None = None, device: torch.device | str = "cpu"):
        """Build from a spec; `local-dir:` paths are relative to `root` (the pipeline folder)."""
        name = spec["model"]
        if name.startswith("local-dir:") and root is not None:
            local = Path(name.removeprefix("local-dir:"))
            name = f"local-dir:{local if local.is_absolute() else Path(root) / local}"
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=spec.get("pretrained"), device=device
        )
        tokenizer = open_clip.get_tokenizer(name)
        if name.startswith("local-dir:"):
            config_path = Path(name.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG
            model.model_cfg = json.loads(config_path.read_text())["model_cfg"]
        else:
            model.model_cfg = open_clip.get_model_config(name)
        return cls(model, preprocess, tokenizer, dict(spec))

    @classmethod
    def from_config(cls, model_cfg: dict) -> Encoder:
        """A new, randomly initialised encoder from an open_clip model config (for training)."""
        model = open_clip.CLIP(**model_cfg, output_dict=True)
        model.model_cfg = model_cfg
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        set_model_preprocess_cfg(model, {"size": model.visual.image_size, "mean": mean, "std": std})
        preprocess = open_clip.image_transform(model.visual.image_size, False, mean, std)
        tokenizer = open_clip.SimpleTokenizer(
            context_length=model_cfg["text_cfg"]["context_length"]
        )
        return cls(model, preprocess, tokenizer, {"model": "local-dir:encoder"})

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write an open_clip folder (config + safetensors) that `local-dir:` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_config_for_hf(self.model, directory / OPEN_CLIP_CONFIG, self.model.model_cfg)
        state = self.model.state_dict()
        state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in state.items()}
        save_file(state, directory / WEIGHTS_NAME)

    @property
    def is_local(self) -> bool:
        return self.spec["model"].startswith("local-dir:")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return (
            self.model.text_projection.shape[-1]
            if self.model.text_projection is not None
            else (self.model.visual.output_dim)
        )

    @property
    def image_side(self) -> int:
        """The side of the square the image tower reads."""
        size = self.model.visual.image_size
        return int(size if isinstance(size, int) else min(size))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess RGB PIL images into a batch tensor."""
        return torch.stack([self.preprocess(image) for image in images])

    @torch.inference_mode()
    def encode_pixels(
        self, pixels: torch.Tensor, normalize: bool = False, mixed: bool = True
    ) -> torch.Tensor:
        """Image embeddings (float32) for preprocessed pixels; `mixed=False` computes them in
        full precision (the prefix of a published checkpoint, see `vlm.device`)."""
        with self._visual_lock, self._autocast(mixed):  # never while tokens are switched on
            features = self.model.encode_image(pixels.to(self.device))
        features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_images(self, images: list[Image.Image], normalize: bool = False) -> torch.Tensor:
        """Image embeddings for RGB PIL images: raw (ClipCap's prefix input) or L2-normalised."""
        return self.encode_pixels(self.pixels(images), normalize=normalize)

    @torch.inference_mode()
    def encode_tokens(
        self, pixels: torch.Tensor, grid: int = 4, mixed: bool = True
    ) -> torch.Tensor:
        """Image tokens in the joint space, [B, 1 + grid², D]: the pooled embedding, then the
        ViT's patch tokens projected like it and average-pooled to a grid × grid layout."""
        pooled, patches = self.pooled_and_patches(pixels.to(self.device), mixed)
        b, n, d = patches.shape
        side = int(round(n**0.5))
        patches = patches.transpose(1, 2).reshape(b, d, side, side)
        patches = F.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)
        return torch.cat([pooled[:, None], patches], dim=1)

    def _autocast(self, mixed: bool = True):
        return autocast(self.device) if mixed else autocast_to(self.device, None)

    def pooled_and_patches(
        self, pixels: torch.Tensor, mixed: bool = True, project: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ViT's pooled embedding and its patch tokens (fp32), the tokens in the joint
        space (`project`) or as the transformer leaves them. Gradients flow when the caller
        allows them (the CLIP stage trains through this)."""
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            raise InputError("image tokens need a ViT image encoder")
        with self._visual_lock:  # open_clip gives tokens only through this shared switch
            visual.output_tokens = True
            try:
                with self._autocast(mixed):
                    pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = False
        tokens = tokens.float()
        if project and visual.proj is not None:
            tokens = tokens @ visual.proj.float()
        return pooled.float(), tokens

    @torch.inference_mode()
    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Text embeddings (float32), L2-normalised by default."""
        tokens = self.tokenizer(texts).to(self.device)
        with autocast(self.device):
            features = self.model.encode_text(tokens)
        features = features.float()
        return F.normalize(features, dim=-1) if normalize else features
