"""The three stages: the CLIP encoder, the LM and the prefix mapper, each a recipe of data,
loss and schedule handed to the stage loop."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.nn.utils.rnn import pad_sequence

from ..caption_head import CaptionHead, caption_vocabulary
from ..data import DataError
from ..encoder import Encoder
from ..errors import ConfigError
from ..factory import build_encoder, build_lm, build_pipeline, train_tokenizer
from ..features import FeatureCache, features_in_memory
from ..pipeline import PipelineConfig
from ..prompts import answer_cue
from ..sequences import prefix_loss, prefixed, scored_ends
from .config import CAPTION_LAYERS, CLIPCAP_MAPPER, SIZES, TrainConfig
from .loop import Stage, checkpoint_layers, epoch_batches, run_stage
from .losses import text_teacher_loss
from .text_batches import answer_mask, pack_texts, split_prompt


def train_clip(dataset, config: TrainConfig, accelerator: Accelerator, progress=None) -> Encoder:
    """Stage 1: contrastive image-text training of a small open_clip CLIP, with CoCa's
    captioning loss beside it when `clip_caption_weight` > 0 (its decoder is dropped after)."""
    encoder = build_encoder(SIZES[config.size]["clip"])
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
    tokenizer = train_tokenizer(texts[:20000], SIZES[config.size]["vocab_size"])
    lm = build_lm(tokenizer, **SIZES[config.size]["lm"])
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
        return build_lm(tokenizer, **SIZES[config.size]["lm"])

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


def prefix_features(dataset, pipeline, config: TrainConfig, accelerator, held_out: bool = False):
    """(texts of each item, lookup(indices) -> features, the text teacher's lines of each item
    or None) for the prefix stage: rendered datasets (whose pools may give teacher lines) are
    encoded in memory; file datasets stream through a `FeatureCache`, their bad
    rows (missing or unreadable images) skipped, counted and listed, or fatal with `strict`.
    `held_out`: the same for the validation examples."""
    if not dataset.from_files:
        data = dataset.prefix_data(config.prefix_examples, config.seed)
        features = features_in_memory(pipeline, data)
        return data.texts, lambda indices: features[indices], data.teacher_lines
    cache = FeatureCache(None if config.features_in_memory else config.feature_cache, pipeline)
    shared = cache.dir is not None  # on disk, each process encodes its share
    rank, world = (accelerator.process_index, accelerator.num_processes) if shared else (0, 1)
    examples = dataset.val_examples() if held_out else dataset.examples()
    records, failed = cache.add(examples, rank=rank, world=world)
    bad = dataset.val_bad if held_out else dataset.bad
    for where, reason in failed:
        bad.skip(where, f"unreadable image: {reason}")
    accelerator.wait_for_everyone()
    cache.refresh()
    records = [(key, texts) for key, texts in records if key in cache and texts]
    what = "validation examples" if held_out else "examples"
    if bad:
        accelerator.print(bad.report(len(records) + len(bad)))
    if not records:
        if held_out:
            return [], None, None
        raise DataError("no readable image with a caption or question in the data")
    accelerator.print(
        f"{len(records)} {what}, {cache.encoded} images encoded now, {len(bad)} skipped"
        + (f"; features cached in {cache.dir}" if shared else "")
    )
    keys = [key for key, _ in records]
    texts = [texts for _, texts in records]
    return texts, lambda indices: cache.get([keys[i] for i in indices]), None


def train_prefix(
    dataset, encoder: Encoder, lm, tokenizer, config: TrainConfig, accelerator, progress=None
):
    """Stage 3: the mapper, trained through the frozen LM from frozen-encoder features; with
    `progress.sample_every`, a few held-out images captioned as it learns."""
    mapper_options = config.mapper or (
        CLIPCAP_MAPPER if config.lm else SIZES[config.size]["mapper"]
    )
    if mapper_options.get("input") == "tokens" and not mapper_options.get("num_tokens"):
        mapper_options = {**mapper_options, "num_tokens": full_grid_tokens(encoder)}
    pipeline = build_pipeline(
        encoder, lm, tokenizer, mapper_options,
        device=accelerator.device, **dataset.pipeline_config(),
    )  # fmt: skip
    frozen = [*pipeline.encoder.model.parameters(), *pipeline.lm.parameters()]
    assert not any(p.requires_grad for p in frozen), "encoder and LM must be frozen"
    if config.finetune_lm:  # the ablation: ClipCap's other variant, the LM learns too
        frozen = list(pipeline.encoder.model.parameters())
        pipeline.lm.float().requires_grad_(True)
    if config.gradient_checkpointing:
        checkpoint_layers(pipeline.lm)
    texts, lookup, lines = prefix_features(dataset, pipeline, config, accelerator)
    # a mapper that does not read the question cannot show each question its own object
    teacher_lines = lines if pipeline.mapper.reads_prompt else None
    batch_size = min(config.prefix_batch_size, len(texts))
    steps = config.prefix_steps
    if config.prefix_epochs is not None:  # an epoch: every (image, text) pair once, as ClipCap
        pairs = sum(len(t) for t in texts)
        steps = max(1, math.ceil(config.prefix_epochs * pairs / batch_size))

    context_share = config.prefix_context
    if context_share is None:
        context_share = dataset.prefix_context
    prefix_length = pipeline.mapper.prefix_length

    def mapper_inputs(features: torch.Tensor, prompts: list[str]) -> tuple:
        """What the mapper reads: the features, and the task prompts' LM states if it reads
        them (the frozen LM's, computed without autograd)."""
        features = features.float().to(accelerator.device)
        if not pipeline.mapper.reads_prompt:
            return (features,)
        return features, *pipeline.prompt_states(prompts)

    def items(indices: list[int], rng, context: bool = False, taught: bool = True):
        """(mapper inputs, tokens, labels) of items; a context item's text ends its line.
        With the text teacher (`taught`, rows of one only), also the teacher's input."""
        pairs = [split_prompt(rng.choice(texts[i]), pipeline.config) for i in indices]
        prompts, targets = [p for p, _ in pairs], [t + "\n" * context for _, t in pairs]
        tokens = pipeline.sequences.training_rows(targets, prompts, eos=not context,
                                                  device=accelerator.device)  # fmt: skip
        item = (mapper_inputs(lookup(indices), prompts), *tokens)
        if config.prefix_text_teacher and taught and not context:
            item += (teacher_rows(indices, prompts, *tokens),)
        return item

    def teacher_rows(indices: list[int], prompts: list[str], tokens, labels):
        """The text teacher's input for each item: the line the data gives for its question
        (`teacher_lines`) or the image's caption line, as text, then the item's own tokens.
        Only questions are taught: a caption has no caption to read first."""
        caption_prompt = pipeline.config.caption_prompt
        rows, starts = [], []
        mask = torch.zeros(tokens.shape)
        on_cpu = tokens.cpu()  # one copy from the device, not one per row
        lengths = scored_ends(labels.cpu())
        for row, (i, prompt, length) in enumerate(zip(indices, prompts, lengths, strict=True)):
            captions = [t for t in texts[i] if t.startswith(caption_prompt)]
            first = []
            if captions and prompt and prompt != caption_prompt:  # a question
                line = teacher_lines[i].get(prompt, captions[0]) if teacher_lines else captions[0]
                first = tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
            if len(first) + length > pipeline.max_positions:
                first = []  # the two would not fit in the LM's positions: not taught
            mask[row, :length] = bool(first)
            rows.append(torch.tensor(first + on_cpu[row, :length].tolist()))
            starts.append(max(len(first), 1))  # a row without a teacher is masked out
        ids = pad_sequence(rows, batch_first=True, padding_value=tokenizer.eos_token_id)
        device = tokens.device
        return ids.to(device), torch.tensor(starts, device=device), mask.to(device)

    def batches(start: int):
        rng = random.Random(f"prefix-texts-{config.seed}-{start}")
        seed = f"prefix-{config.seed}-{start}"
        for batch in epoch_batches(len(texts), batch_size, seed, accelerator):
            half = len(batch) // 2 if rng.random() < context_share else 0
            if half:  # rows of two items: the first half is read before the second
                main = items(batch[half : 2 * half], rng, taught=False)
                context = items(batch[:half], rng, context=True)
                length = 2 * prefix_length + main[1].shape[1] + context[1].shape[1]
                if length <= pipeline.max_positions:
                    yield main, context
                    continue
            yield items(batch, rng), None  # (or the two would not fit in the LM's positions)

    def parts(module):  # (lm, mapper) of the trained module: the mapper, or both (ablation)
        return (module["lm"], module["mapper"]) if config.finetune_lm else (pipeline.lm, module)

    def loss_fn(module, batch):
        (inputs, tokens, labels, *teacher), context = batch
        lm, mapper = parts(module)
        if context is not None:
            context = (mapper(*context[0]), *context[1:])
        if not teacher or context is not None:
            return prefix_loss(lm, mapper(*inputs), tokens, labels, context)
        embeds, targets = prefixed(lm, mapper(*inputs), tokens, labels)
        out = lm(inputs_embeds=embeds, labels=targets, use_cache=False)
        taught = text_teacher_loss(lm, out.logits, prefix_length, *teacher)
        return out.loss + config.prefix_text_teacher * taught

    def check():  # the method's promise: nothing but the mapper learns (the LM too: ablation)
        assert all(p.grad is None for p in frozen), "a gradient reached a frozen part"

    validate = None
    if config.val_every and dataset.from_files:
        val_texts, val_lookup, _ = prefix_features(dataset, pipeline, config, accelerator, True)
        val_pairs = [(i, split_prompt(t, pipeline.config)) for i, ts in enumerate(val_texts)
                     for t in ts]  # fmt: skip

        @torch.no_grad()
        def validate(module):  # every held-out (image, text) pair once
            lm, mapper = parts(module)
            losses = []
            for start in range(0, len(val_pairs), batch_size):
                chunk = val_pairs[start : start + batch_size]
                prompts, targets = [p for _, (p, _) in chunk], [t for _, (_, t) in chunk]
                inputs = mapper_inputs(val_lookup([i for i, _ in chunk]), prompts)
                tokens, labels = pipeline.sequences.training_rows(
                    targets, prompts, device=accelerator.device
                )
                loss = prefix_loss(lm, mapper(*inputs), tokens, labels)
                losses.append(loss.item())
            return float(sum(losses) / len(losses))

        validate = validate if val_pairs else None

    module = pipeline.mapper.requires_grad_(True)
    if config.finetune_lm:
        module = torch.nn.ModuleDict({"mapper": module, "lm": pipeline.lm})
    if progress is not None and progress.sample_every:
        progress = dataclasses.replace(progress, samples=_sampler(dataset, pipeline, config))
    recipe = Stage("prefix", module, loss_fn, batches, steps, config.prefix_lr, batch_size,
                   validate, check)  # fmt: skip
    module = run_stage(recipe, config, accelerator, progress=progress)
    pipeline.lm, pipeline.mapper = parts(module)
    pipeline.lm.requires_grad_(False)
    return pipeline


SAMPLES = 4  # held-out images the prefix stage captions as it learns (Progress.sample_every)


def _sampler(dataset, pipeline, config: TrainConfig) -> Callable[[], dict[str, str]] | None:
    """What captions a few held-out images (the dataset's calibration examples: never trained
    on) with the pipeline as it is: {reference caption: caption}."""
    examples = dataset.calibration_examples(SAMPLES, config.seed)[:SAMPLES]
    if not examples or "caption" not in pipeline.tasks:
        return None
    images = [e.image for e in examples]
    names = [e.captions[0] if e.captions else f"image {i + 1}" for i, e in enumerate(examples)]

    def samples() -> dict[str, str]:
        return dict(zip(names, pipeline.caption(images), strict=True))

    return samples


def full_grid_tokens(encoder: Encoder) -> int:
    """`num_tokens` of a mapper reading the encoder's image tokens: its pooled embedding and
    its full grid of patch tokens (the bundled model's choice: 1 + 8 × 8)."""
    grid = getattr(encoder.model.visual, "grid_size", None)
    if not grid:
        raise ConfigError("--mapper-input tokens needs a ViT image encoder (it reads patch tokens)")
    return 1 + grid[0] * grid[1]
