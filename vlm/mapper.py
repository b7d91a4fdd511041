"""The prefix mapper: CLIP image embedding -> k vectors in the frozen LM's embedding space.

Two kinds, as in ClipCap (Mokady et al. 2021), with ClipCap's parameter names, so that its
published checkpoints load as they are (their keys minus the `clip_project.` prefix):

- `mlp`: Linear -> Tanh -> Linear to k * d_lm            (keys `model.0.*`, `model.2.*`)
- `transformer`: the embedding is projected to `clip_length` tokens, k learned constant tokens
  are appended, a pre-norm transformer runs over both and the last k positions are the prefix
  (keys `linear.*`, `prefix_const`, `transformer.layers.{i}.*`).

Beyond ClipCap, the transformer mapper can read the image as *tokens* (`input="tokens"`: the
encoder's pooled embedding followed by its patch tokens, average-pooled to a coarser grid), so
that what is where in the image reaches the LM without first being squeezed into one vector.

It can also read the *task prompt* (`prompt_dim` > 0), as InstructBLIP's instruction-aware
Q-Former does (Dai et al. 2023): the frozen LM's own hidden states of the text that will follow
the prefix ("Caption:", "Question: what color is the star? Answer:") join the image tokens, so
the prefix can carry what that task needs. The LM reads them; it is not changed.

Options that were tried and removed are listed in `RETIRED_OPTIONS` at their "off" value: a saved
config may still name them there (`PrefixMapper.from_config` drops them), and one that sets
them to anything else needs the older vlm that had the option.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .config import check_keys
from .errors import ConfigError, InputError

MAPPER_KINDS = ("mlp", "transformer")

# Removed options, each at the value that turned it off (what older saved configs hold):
# `vocab_size` (> 0: each prefix vector a soft word of the LM's vocabulary).
RETIRED_OPTIONS = {"vocab_size": 0}


class _Attention(nn.Module):
    """Multi-head self-attention with ClipCap's parameter names (no bias on q and kv)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, N] (True: a real token) keeps padding out of every token's keys."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.to_keys_values(x).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        keys = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class PrefixMapper(nn.Module, PyTorchModelHubMixin, library_name="vlm", tags=["clipcap"]):
    """Maps a CLIP embedding [B, clip_dim] to a visual prefix [B, prefix_length, lm_dim].

    `normalize_input` L2-normalises the embedding first (ClipCap's transformer checkpoint
    does; its MLP checkpoint reads the raw `encode_image` output)."""

    def __init__(
        self,
        kind: str = "mlp",
        clip_dim: int = 512,
        lm_dim: int = 768,
        prefix_length: int = 10,
        hidden_dim: int | None = None,
        clip_length: int = 10,
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        normalize_input: bool = False,
        input: str = "embedding",
        num_tokens: int = 0,
        prompt_dim: int = 0,
    ):
        super().__init__()
        if kind not in MAPPER_KINDS:
            raise ConfigError(f"unknown mapper kind {kind!r}; expected one of {MAPPER_KINDS}")
        self.config = dict(
            kind=kind, clip_dim=clip_dim, lm_dim=lm_dim, prefix_length=prefix_length,
            hidden_dim=hidden_dim, clip_length=clip_length, num_layers=num_layers,
            num_heads=num_heads, mlp_ratio=mlp_ratio, normalize_input=normalize_input,
            input=input, num_tokens=num_tokens, prompt_dim=prompt_dim,
        )  # fmt: skip
        if input not in ("embedding", "tokens") or (input == "tokens" and kind != "transformer"):
            raise ConfigError("input='tokens' needs kind='transformer'; else input='embedding'")
        if input == "tokens" and num_tokens < 1:
            raise ConfigError(
                f"input='tokens' needs num_tokens ≥ 1 (a pipeline's encoder gives its pooled "
                f"embedding and a grid × grid of patch tokens: 1 + grid²), not {num_tokens}"
            )
        if prompt_dim and kind != "transformer":
            raise ConfigError("prompt_dim > 0 (reading the task prompt) needs kind='transformer'")
        self.input = input
        self.kind = kind
        self.prompt_dim = prompt_dim
        self.prefix_length = prefix_length
        self.lm_dim = lm_dim
        self.clip_length = clip_length
        self.normalize_input = normalize_input
        if kind == "mlp":
            hidden = hidden_dim or lm_dim * prefix_length // 2
            self.model = nn.Sequential(
                nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, lm_dim * prefix_length)
            )
        else:
            if input == "tokens":  # each image token projected, with a learned position
                self.linear = nn.Linear(clip_dim, lm_dim)
                self.token_position = nn.Parameter(torch.zeros(num_tokens, lm_dim))
            else:
                self.linear = nn.Linear(clip_dim, clip_length * lm_dim)
            self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_dim))
            if prompt_dim:  # the LM's hidden states of the task prompt, in the mapper's width
                self.prompt_linear = nn.Linear(prompt_dim, lm_dim)
            self.transformer = _Transformer(lm_dim, num_heads, num_layers, mlp_ratio)

    @classmethod
    def from_config(cls, config: dict, where: str = "mapper") -> PrefixMapper:
        """The mapper a saved config describes (`self.config`, as `save_pretrained` writes it).
        A key it does not know is refused by name (`where` says whose config); a retired
        option (`RETIRED_OPTIONS`) at its "off" value is dropped; at any other value it is
        refused (ConfigError), since this vlm cannot build that mapper."""
        check_keys(config, [*inspect.signature(cls).parameters, *RETIRED_OPTIONS], where)
        options = dict(config)
        for key, off in RETIRED_OPTIONS.items():
            if key not in options:
                continue
            value = options.pop(key)
            if value != off:
                raise ConfigError(
                    f"mapper option {key!r} = {value!r}: this option was removed; the model "
                    f"needs an older vlm (this one reads only {key!r} = {off!r})"
                )
        return cls(**options)

    @property
    def reads_prompt(self) -> bool:
        """Whether the prefix depends on the task prompt (`prompt_dim` > 0)."""
        return self.prompt_dim > 0

    def forward(
        self,
        embedding: torch.Tensor,
        prompt: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, clip_dim] embeddings (or [B, N, clip_dim] tokens) -> [B, k, lm_dim] prefix.

        A mapper that `reads_prompt` also takes the LM's hidden states of each task prompt,
        `prompt` [B, T, prompt_dim], right-padded, with `prompt_mask` [B, T] (True: a token)."""
        if self.reads_prompt and prompt is None:
            raise InputError("this mapper reads the task prompt: give prompt (and prompt_mask)")
        if self.normalize_input:
            embedding = F.normalize(embedding, dim=-1)
        if self.kind == "mlp":
            return self.model(embedding).view(-1, self.prefix_length, self.lm_dim)
        if self.input == "tokens":
            tokens = self.linear(embedding) + self.token_position
        else:
            tokens = self.linear(embedding).view(-1, self.clip_length, self.lm_dim)
        constant = self.prefix_const.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if not self.reads_prompt:
            return self.transformer(torch.cat([tokens, constant], dim=1))[:, tokens.shape[1] :]
        prompt = self.prompt_linear(prompt.to(tokens.dtype))
        mask = None  # every prompt token is real unless a padding mask says otherwise
        if prompt_mask is not None:  # image tokens and constants are always real
            edges = (tokens.shape[1], constant.shape[1])
            mask = F.pad(prompt_mask.bool(), edges, value=True)
        x = self.transformer(torch.cat([tokens, prompt, constant], dim=1), mask)
        return x[:, -constant.shape[1] :]
