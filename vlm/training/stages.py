"""The three stages: the CLIP encoder, the LM and the prefix mapper, each a recipe of data,
loss and schedule handed to the stage loop."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..caption_head import CaptionHead, caption_vocabulary
from ..encoder import Encoder
from ..errors import ConfigError
from ..factory import build_encoder, build_lm, train_tokenizer
from ..pipeline import PipelineConfig
from ..prompts import answer_cue
from .config import CAPTION_LAYERS, MODEL_SIZES, TrainConfig
from .loop import Stage, epoch_batches, run_stage
from .text_batches import answer_mask, pack_texts


def train_clip(dataset, config: TrainConfig, accelerator: Accelerator, progress=None) -> Encoder:
    """Stage 1: contrastive image-text training of a small open_clip CLIP, with CoCa's
    captioning loss beside it when `clip_caption_weight` > 0 (its decoder is dropped after)."""
    encoder = build_encoder(MODEL_SIZES[config.size]["clip"])
    data = dataset.clip_data(config.clip_examples, config.seed)
    loss = open_clip.ClipLoss(
        world_size=accelerator.num_processes, rank=accelerator.process_index,
        local_loss=False, gather_with_grad=True,
    )  # fmt: skip
    model = torch.nn.ModuleDict({"clip": encoder.model.requires_grad_(True)})
    captioning = config.clip_caption_weight > 0
    if captioning:
        captions = sorted({texts[0] for texts in data.texts})  # the first: ShapeWorld's canonical
        vocabulary = caption_vocabulary(encoder.tokenizer, captions)
        width = encoder.model.visual.transformer.width
        context = encoder.tokenizer.context_length
        model["caption"] = CaptionHead(vocabulary, width, CAPTION_LAYERS, context)

    def batches(start: int):
        rng = random.Random(f"clip-texts-{config.seed}-{start}")
        indices = epoch_batches(len(data), config.batch_size, f"clip-{config.seed}-{start}",
                          accelerator, pairs=True)  # fmt: skip
        for batch in indices:
            items = [data[i] for i in batch]
            pixels = encoder.pixels([image for image, _ in items])
            tokens = encoder.tokenizer([rng.choice(texts) for _, texts in items])
            captions = encoder.tokenizer([texts[0] for _, texts in items]) if captioning else None
            yield pixels.to(accelerator.device), tokens.to(accelerator.device), captions

    def loss_fn(module, batch):
        pixels, tokens, captions = batch
        clip = module["clip"]  # encoder.model: the tokens come through the encoder's lock
        pooled, patches = encoder.pooled_and_patches(pixels, mixed=False, project=False)
        image = F.normalize(pooled, dim=-1)
        text = clip.encode_text(tokens, normalize=True)
        total = loss(image, text, clip.logit_scale.exp())
        if captioning:
            # half the batch, one scene of each twin pair: half the decoder's cost
            half = captions[::2].to(accelerator.device)
            caption_loss = module["caption"](patches[::2], half)
            total = total + config.clip_caption_weight * caption_loss
        return total

    recipe = Stage("clip", model, loss_fn, batches, config.clip_steps, config.clip_lr,
                   batch_size=config.batch_size)  # fmt: skip
    model = run_stage(recipe, config, accelerator, progress=progress)
    encoder.model = model["clip"].requires_grad_(False)
    return encoder


def train_lm(dataset, config: TrainConfig, accelerator: Accelerator, progress=None):
    """Stage 2: a byte-level BPE tokenizer and a small GPT-2 trained on the dataset's text.

    Answer tokens weigh `lm_answer_weight` times the rest in the loss: they are the few
    tokens that only reading the context predicts (a caption is as random as its scene). At
    weight 1 the LM never learned to look an answer up: with the caption on the line before,
    "is there a green circle?" was answered at chance (0.51); at 10, 0.95
    (experiments/text_answers.py)."""
    texts = dataset.texts(config.lm_examples, config.seed)
    tokenizer = train_tokenizer(texts[:20000], MODEL_SIZES[config.size]["vocab_size"])
    shape = MODEL_SIZES[config.size]["lm"]
    lm = build_lm(
        tokenizer, **{**shape, "n_positions": config.lm_positions or shape["n_positions"]}
    )
    block_size = lm.config.n_positions  # the LM reads text at every position it has
    blocks = pack_texts(tokenizer, texts, block_size)
    template = dataset.pipeline_config().get("question_template", PipelineConfig.question_template)
    cue = answer_cue(template)
    more = dataset.answer_cues()
    marks = answer_mask(tokenizer, blocks, cue, more)
    weights = 1 + (config.lm_answer_weight - 1) * marks.float()

    def batches(start: int):
        seed = f"lm-{config.seed}-{start}"
        for batch in epoch_batches(len(blocks), config.lm_batch_size, seed, accelerator):
            yield blocks[batch].to(accelerator.device), weights[batch].to(accelerator.device)

    def loss_fn(module, batch):
        tokens, weight = batch
        logits = module(input_ids=tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return (loss * weight[:, 1:].flatten()).sum() / weight[:, 1:].sum()

    def held_out_loss(texts: list[str]) -> Callable[[torch.nn.Module], float] | None:
        """The held-out texts' loss, weighted as in training (None: no text)."""
        blocks = pack_texts(tokenizer, texts, block_size) if texts else None
        if blocks is None or not len(blocks):
            return None
        weights = 1 + (config.lm_answer_weight - 1) * answer_mask(tokenizer, blocks, cue, more)

        @torch.no_grad()
        def loss(module):
            chunks = range(0, len(blocks), config.lm_batch_size)
            losses = [loss_fn(module, (blocks[i : i + config.lm_batch_size].to(
                accelerator.device), weights[i : i + config.lm_batch_size].to(
                accelerator.device))).item() for i in chunks]  # fmt: skip
            return float(sum(losses) / len(losses))

        return loss

    # logged every val_every steps: file data's validation part
    validate = held_out_loss(dataset.val_texts())

    def stage(name: str, module, **kwargs):
        recipe = Stage(name, module, loss_fn, batches, config.lm_steps, config.lm_lr,
                       batch_size=config.lm_batch_size, validate=validate)  # fmt: skip
        return run_stage(recipe, config, accelerator, progress=progress, **kwargs)

    if config.lm_candidates <= 1:
        return stage("lm", lm), tokenizer
    score = validate  # the choice: that part, else the dataset's own held-out documents
    if score is None:
        score = held_out_loss(dataset.selection_texts())
    if score is None:
        raise ConfigError("--lm-candidates needs held-out text to choose by: give validation "
                         "data (--val-data or --val-fraction)")  # fmt: skip

    def candidate(k: int):  # the first is the LM a run without selection starts from
        torch.manual_seed(config.seed * 1000 + k)
        return build_lm(tokenizer, **MODEL_SIZES[config.size]["lm"])

    losses = []
    for k in range(config.lm_candidates):
        module = stage(f"lm-{k}", lm if k == 0 else candidate(k), until=config.lm_select_steps)
        losses.append(score(module))
    best = min(range(len(losses)), key=losses.__getitem__)
    accelerator.print(
        f"[lm] held-out text loss of each candidate after "
        f"{config.lm_select_steps} steps: "
        + ", ".join(f"{v:.4f}" for v in losses)
        + f"; going on with {best}"
    )
    if accelerator.is_main_process:
        with (config.out / "log.jsonl").open("a") as handle:
            handle.write(
                json.dumps(dict(stage="lm-selection", candidates=losses, chosen=best)) + "\n"
            )
    return stage(f"lm-{best}", candidate(best), resume=True), tokenizer


def full_grid_tokens(encoder: Encoder) -> int:
    """`num_tokens` of a mapper reading the encoder's image tokens: its pooled embedding and
    its full grid of patch tokens (the bundled model's choice: 1 + 8 × 8)."""
    grid = getattr(encoder.model.visual, "grid_size", None)
    if not grid:
        raise ConfigError("--mapper-input tokens needs a ViT image encoder (it reads patch tokens)")
    return 1 + grid[0] * grid[1]
