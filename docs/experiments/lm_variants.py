"""Experiment: LM-stage trainings with recipe changes that the code's defaults do not have.

Runs `python -m vlm ...` with some of these changes patched in (names after `--variants`,
comma-separated; the rest of the command line goes to the CLI unchanged):

- `desc-first`: a scene's document opens with its caption and its paraphrase (in random
  order), then its questions; in the defaults a question may come before any description;
- `shape-first`: a third description in each scene document, in the LM's text only, that
  names each object's shape before its colour and size ("the star is red and small, the
  circle is blue"), so the colour of a named shape is a word after it, as the shape after a
  named colour is in the caption;
- `noun-first`: a third description in each scene document, in the LM's text only, in the
  order of a Romance language ("a star red and small left of a cross blue and large"): the
  word right after a shape is its colour, so predicting it is the colour lookup itself
  (find the same shape in the caption, read the word before it), on every such line;
- `drill`: every colour, shape and size question of the scene, plus one or two others (the
  defaults: one to four questions of any kind);
- `text-scenes`: the scene documents describe 1-5 objects without a layout (text only; images
  hold 1-3), so that guessing a scene's colour pays less;
- `doc-mask`: packed documents do not see each other (a block-diagonal attention mask);
- `mask-first`: the same mask for the first half of the LM's training steps only, then the
  documents packed together as in the defaults (copying forms apart, reading across after);
- `llama`: a Llama-architecture LM (rotary positions, RMSNorm, SwiGLU) of the same width,
  depth and heads in place of GPT-2;
- `width=N`, `heads=N`, `layers=N`: the small LM's size;
- `sin-pos`: the position embeddings start as sinusoids of the token embeddings' std
  (`factory.build_lm(sinusoid_positions=True)`), in which "the previous position" is one
  linear map for every position;
- `pos-std=X`: they start at random with std X (GPT-2's init: 0.02, a fifth of the token
  embeddings' 0.1);
- `prefix-grey=X`: the prefix stage (not the LM's) gets a share X of colourless views with
  their colourless captions (`ShapeWorld.prefix_colourless_share`);
- `prefix-keys=X`: a share X of the prefix stage's images get their caption followed by a
  k-shot line in a seen format instead of their texts (`ShapeWorld.prefix_key_lines`);
- `prefix-shuffle`: while the mapper trains, the order of each example's prefix vectors is
  shuffled, so that no meaning rides on which vector comes before which (an LM that copies the
  word after a matching one cannot read a pair of neighbouring vectors); not at inference.

    PYTHONPATH=. python docs/experiments/lm_variants.py --variants desc-first,doc-mask \\
        train shapeworld --stages lm --out runs/dm0 --seed 0 --lm-answer-weight 30

Each run is then read by `text_answers.py` and `lookups.py`. Results: docs/shapeworld.md,
"Which lookups the LM learns", "Why the lookups do not form" and "Positions that start as
sinusoids" (with `sin-pos` the shape lookup formed in 3 trainings of 3), and "Four layers, soft
words, shuffled prefixes and what held-out captions track".
"""

from __future__ import annotations

import random
import sys

import torch

from vlm import datasets, train
from vlm import shapeworld as sw
from vlm.cli import main as cli
from vlm.mapper import PrefixMapper


def _text_scene(rng: random.Random) -> sw.Scene:
    """1-5 objects of any combination, left to right in random order, no layout."""
    every = [(c, s) for c in sw.COLORS for s in sw.SHAPES]
    objects = []
    for _ in range(rng.randint(1, 5)):
        color, shape = rng.choice(every)
        objects.append(sw.Obj(shape, color, rng.choice(sw.SIZES), rng.random(), rng.random()))
    return sw.Scene(tuple(objects))


def _asked(rng: random.Random, pairs, qa: list[str], drill: bool) -> list[str]:
    if not drill:
        return rng.sample(qa, min(len(qa), rng.randint(1, 4)))
    kinds = [sw.question_type(q) for q, _ in pairs]
    look = [t for t, k in zip(qa, kinds, strict=True) if k in ("color", "shape", "size")]
    rest = [t for t in qa if t not in look]
    asked = look + rng.sample(rest, min(len(rest), rng.randint(1, 2)))
    rng.shuffle(asked)
    return asked


def _shape_first(scene: sw.Scene) -> str:
    """ "the star is red and small, the circle is blue and large": each object's shape before
    its colour and size, so that the colour of a named shape is a word *after* it."""
    return ", ".join(f"the {o.shape} is {o.color} and {o.size}" for o in scene.objects)


def _noun_first(scene: sw.Scene) -> str:
    """ "a star red and small left of a cross blue and large": the caption's objects, each
    shape right before its colour and size."""
    return " left of ".join(f"a {o.shape} {o.color} and {o.size}" for o in scene.objects)


def _texts(variants: set[str]):
    def texts(self, n: int, seed: int) -> list[str]:  # ShapeWorld.texts with the variants
        rng = random.Random(f"lm-{seed}")
        documents = []
        for _ in range(n):
            if rng.random() < self.few_shot_share:
                documents.append(sw.few_shot_document(rng, datasets.CAPTION_PROMPT, "any"))
                continue
            text_only = "text-scenes" in variants
            scene = _text_scene(rng) if text_only else sw.sample_scene(rng, split="any")
            pairs = sw.questions(scene, rng, forms="all", held_out_no=True)
            qa = [datasets.qa_text(q, a) for q, a in pairs]
            lines = [f"{datasets.CAPTION_PROMPT} {sw.describe(scene)}",
                     f"{datasets.CAPTION_PROMPT} {sw.paraphrase(scene, rng)}"]  # fmt: skip
            if "shape-first" in variants:
                lines.append(f"{datasets.CAPTION_PROMPT} {_shape_first(scene)}")
            if "noun-first" in variants:
                lines.append(f"{datasets.CAPTION_PROMPT} {_noun_first(scene)}")
            if "desc-first" in variants:
                rng.shuffle(lines)
                lines += _asked(rng, pairs, qa, "drill" in variants)
            else:
                lines += _asked(rng, pairs, qa, "drill" in variants)
                rng.shuffle(lines)
            documents.append("\n".join(lines))
        return documents

    return texts


def _document_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    ends = (tokens[:, :-1] == eos).long().cumsum(1)
    document = torch.cat([torch.zeros_like(tokens[:, :1]), ends], 1)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device)
    return ((document[:, :, None] == document[:, None, :]) & causal.tril())[:, None]


def _masked_run_stage(run_stage, masked_share: float = 1.0):
    def patched(name, module, loss_fn, batches, steps, *args, **kwargs):
        if name == "lm":
            plain = loss_fn
            calls = [0]

            def loss_fn(module, batch):  # train_lm's own loss, its LM reading documents apart
                calls[0] += torch.is_grad_enabled()  # training steps, not validation
                if calls[0] > masked_share * steps:
                    return plain(module, batch)
                mask = _document_mask(batch[0], module.config.eos_token_id)
                masked = lambda **inputs: module(attention_mask=mask, **inputs)  # noqa: E731
                return plain(masked, batch)

        return run_stage(name, module, loss_fn, batches, steps, *args, **kwargs)

    return patched


def _llama(tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int, **_):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=256,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
        max_position_embeddings=n_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    lm = LlamaForCausalLM(config)
    torch.nn.init.normal_(lm.get_input_embeddings().weight, std=0.1)  # as build_lm
    lm.config.n_positions = n_positions  # train_lm's block size
    return lm


def _positions(build_lm, std: float | None):
    """build_lm with sinusoid positions (`std` None) or random ones of std `std`."""

    def build(*args, **kwargs):
        lm = build_lm(*args, sinusoid_positions=std is None, **kwargs)
        if std is not None:
            torch.nn.init.normal_(lm.transformer.wpe.weight, std=std)
        return lm

    return build


def _prefix_option(prefix_data, name: str, share: float):
    def patched(self, n: int, seed: int):
        setattr(self, name, share)
        return prefix_data(self, n, seed)

    return patched


def _shuffled(forward):
    """PrefixMapper.forward that, in training, permutes each example's prefix vectors."""

    def patched(self, *args, **kwargs):
        prefix = forward(self, *args, **kwargs)
        if not self.training:
            return prefix
        order = torch.rand(prefix.shape[:2], device=prefix.device).argsort(dim=1)
        return prefix.gather(1, order[..., None].expand_as(prefix))

    return patched


def main(argv: list[str]) -> int:
    variants: set[str] = set()
    if argv[:1] == ["--variants"]:
        variants, argv = set(argv[1].split(",")), argv[2:]
    size = train.SIZES["small"]["lm"]
    for variant in variants:
        key, _, value = variant.partition("=")
        if key in ("width", "heads", "layers"):
            size[{"width": "n_embd", "heads": "n_head", "layers": "n_layer"}[key]] = int(value)
    if variants & {"desc-first", "drill", "text-scenes", "shape-first", "noun-first"}:
        datasets.ShapeWorld.texts = _texts(variants)
    if "doc-mask" in variants:
        train.run_stage = _masked_run_stage(train.run_stage)
    if "mask-first" in variants:
        train.run_stage = _masked_run_stage(train.run_stage, masked_share=0.5)
    if "sin-pos" in variants:
        train.build_lm = _positions(train.build_lm, None)
    for variant in variants:
        if variant.startswith("pos-std="):
            train.build_lm = _positions(train.build_lm, float(variant.partition("=")[2]))
    if "llama" in variants:
        train.build_lm = _llama
    if "prefix-shuffle" in variants:
        PrefixMapper.forward = _shuffled(PrefixMapper.forward)
    options = {"prefix-grey": "prefix_colourless_share", "prefix-keys": "prefix_key_lines"}
    for variant in variants:
        key, _, value = variant.partition("=")
        if key in options:
            datasets.ShapeWorld.prefix_data = _prefix_option(
                datasets.ShapeWorld.prefix_data, options[key], float(value)
            )
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
