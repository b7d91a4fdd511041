"""Build new, untrained parts from configs: a small CLIP, a tokenizer, a GPT-2, a pipeline.

The trainer starts from these, and the tests build their tiny models with them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .encoder import Encoder
from .mapper import PrefixMapper
from .pipeline import Pipeline, PipelineConfig

EOS = "<|endoftext|>"


def clip_config(
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 4,
    embed_dim: int = 128,
    text_width: int = 128,
    text_layers: int = 3,
    context_length: int = 32,
) -> dict:
    """An open_clip model config (the format of open_clip's model_configs/*.json) for a small
    ViT CLIP; the text tower keeps CLIP's BPE tokenizer, so open_clip loads it as is."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size, "patch_size": patch_size, "width": width,
            "layers": layers, "head_width": 32,
        },
        "text_cfg": {
            "context_length": context_length, "vocab_size": 49408, "width": text_width,
            "heads": max(1, text_width // 32), "layers": text_layers,
        },
    }  # fmt: skip


def build_encoder(model_cfg: dict) -> Encoder:
    """A randomly initialised open_clip CLIP with its preprocess and tokenizer."""
    return Encoder.from_config(copy.deepcopy(model_cfg))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained with `tokenizers` on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def build_lm(
    tokenizer,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 96,
    embedding_std: float = 0.1,
    dropout: float = 0.0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2-architecture LM sized for `tokenizer`.

    Token embeddings start at std `embedding_std`, not GPT-2's 0.02: words that only context can
    tell apart (ShapeWorld's "small" and "large") otherwise drift together before the LM learns
    to copy them, and then it never can (cosine 0.996, each size 50% even right after the same
    caption; with 0.1, cosine 0.675 and 63-85%: experiments/word_probabilities.py).
    No dropout by default, as nanoGPT pretrains: with GPT-2's 0.1 the ShapeWorld LM answers
    relation questions from the caption 0.87 of the time, without it 0.97."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    lm = GPT2LMHeadModel(config)
    torch.nn.init.normal_(lm.get_input_embeddings().weight, std=embedding_std)  # tied: lm_head too
    return lm


def build_pipeline(
    encoder: Encoder, lm, tokenizer, mapper: dict | None = None, device=None, **config
) -> Pipeline:
    """A pipeline around existing encoder and LM with a new mapper between them; `mapper`
    holds PrefixMapper options (kind, prefix_length, …), sized to the encoder and the LM;
    `reads_prompt=True` sizes it to read the LM's hidden states of the task prompt."""
    options = {"kind": "mlp", "prefix_length": 8, "normalize_input": True, **(mapper or {})}
    lm_dim = lm.get_input_embeddings().embedding_dim  # not always hidden_size (OPT-350m)
    if options.pop("reads_prompt", False):  # the mapper reads the LM's last hidden states
        options["prompt_dim"] = lm.config.hidden_size
    mapper = PrefixMapper(clip_dim=encoder.embed_dim, lm_dim=lm_dim, **options)
    pipeline_config = PipelineConfig(encoder=encoder.spec, mapper=mapper.config, **config)
    return Pipeline(encoder, lm, tokenizer, mapper, pipeline_config, device=device)
