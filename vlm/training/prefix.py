"""Stage 3, the method itself: the mapper trained through the frozen LM from frozen-encoder
features. `PrefixRecipe` is the stage's recipe (its batches, loss, gradient check and held-out
loss) as one object; `train_prefix` builds the pipeline, the recipe, and runs it."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data import DataError
from ..encoder import Encoder
from ..errors import SequenceTooLong
from ..factory import build_pipeline
from ..features import FeatureCache, encode_in_memory
from ..prompts import VIDEO_PROMPT, answer_cue
from ..sequences import IGNORE, prefix_loss, prefixed, scored_ends
from ..video import ANSWER_TOKENS, DESCRIPTION_TOKENS
from .config import CLIPCAP_MAPPER, MODEL_SIZES, TrainConfig
from .loop import Stage, checkpoint_layers, epoch_batches, run_stage
from .losses import text_teacher_loss
from .stages import full_grid_tokens
from .text_batches import split_prompt

SAMPLES = 4  # held-out images the prefix stage captions as it learns (Progress.sample_every)


def prefix_features(dataset, pipeline, config: TrainConfig, accelerator, held_out: bool = False):
    """(texts of each item, lookup(indices) -> features, the text teacher's lines of each item
    or None) for the prefix stage: rendered datasets (whose pools may give teacher lines) are
    encoded in memory; file datasets stream through a `FeatureCache`, their bad
    rows (missing or unreadable images) skipped, counted and listed, or fatal with `strict`.
    `held_out`: the same for the validation examples."""
    if not dataset.from_files:
        data = dataset.prefix_data(config.prefix_examples, config.seed)
        features = encode_in_memory(pipeline, data)
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


class PrefixRecipe:
    """The prefix stage's recipe for `pipeline` on `dataset`: what a batch is (items of one,
    rows of two items where the first is read before the second, or clips: each frame's
    prefix after its timestamp, as `Pipeline.video_sequence` lays them out, then the clip's
    text), the loss (with the text teacher on questions where the config asks), the check
    that nothing frozen learns and the held-out loss of file data."""

    def __init__(self, dataset, pipeline, config: TrainConfig, accelerator):
        self.pipeline, self.config, self.accelerator = pipeline, config, accelerator
        self.frozen = [*pipeline.encoder.model.parameters(), *pipeline.lm.parameters()]
        assert not any(p.requires_grad for p in self.frozen), "encoder and LM must be frozen"
        if config.finetune_lm:  # the ablation: ClipCap's other variant, the LM learns too
            self.frozen = list(pipeline.encoder.model.parameters())
            pipeline.lm.float().requires_grad_(True)
        if config.gradient_checkpointing:
            checkpoint_layers(pipeline.lm)
        self.texts, self.lookup, lines = prefix_features(dataset, pipeline, config, accelerator)
        # a mapper that does not read the question cannot show each question its own object
        self.teacher_lines = lines if pipeline.mapper.reads_prompt else None
        self.batch_size = min(config.prefix_batch_size, len(self.texts))
        self.steps = config.prefix_steps
        if config.prefix_epochs is not None:  # an epoch: every (image, text) pair once
            pairs = sum(len(t) for t in self.texts)
            self.steps = max(1, math.ceil(config.prefix_epochs * pairs / self.batch_size))
        share = config.prefix_context
        self.context_share = dataset.prefix_context if share is None else share
        self.clips = dataset.video_data(config.prefix_examples, config.seed)
        self.clip_features = None
        if self.clips is not None and len(self.clips):
            frames = encode_in_memory(pipeline, self.clips.images())
            self.clip_features = frames.view(len(self.clips), -1, *frames.shape[1:])
        self.clip_share = dataset.clip_batch_share if self.clip_features is not None else 0.0
        self.val_pairs, self.val_lookup = [], None
        if config.val_every and dataset.from_files:
            val_texts, self.val_lookup, _ = prefix_features(dataset, pipeline, config,
                                                            accelerator, True)  # fmt: skip
            self.val_pairs = [(i, split_prompt(t, pipeline.config))
                              for i, ts in enumerate(val_texts) for t in ts]  # fmt: skip

    def stage(self) -> Stage:
        """The stage the loop runs: the mapper (and the LM in the ablation)."""
        module = self.pipeline.mapper.requires_grad_(True)
        if self.config.finetune_lm:
            module = torch.nn.ModuleDict({"mapper": module, "lm": self.pipeline.lm})
        validate = self.validate if self.val_pairs else None
        return Stage("prefix", module, self.loss, self.batches, self.steps,
                     self.config.prefix_lr, self.batch_size, validate, self.check)  # fmt: skip

    def parts(self, module) -> tuple:
        """(lm, mapper) of the trained module: the mapper, or both (the ablation)."""
        if self.config.finetune_lm:
            return module["lm"], module["mapper"]
        return self.pipeline.lm, module

    def mapper_inputs(self, features: torch.Tensor, prompts: list[str]) -> tuple:
        """What the mapper reads: the features, and the task prompts' LM states if it reads
        them (the frozen LM's, computed without autograd)."""
        features = features.float().to(self.accelerator.device)
        if not self.pipeline.mapper.reads_prompt:
            return (features,)
        return features, *self.pipeline.prompt_states(prompts)

    def items(self, indices: list[int], rng, context: bool = False, taught: bool = True):
        """(mapper inputs, tokens, labels) of items; a context item's text ends its line.
        With the text teacher (`taught`, rows of one only), also the teacher's input."""
        pairs = [split_prompt(rng.choice(self.texts[i]), self.pipeline.config) for i in indices]
        prompts, targets = [p for p, _ in pairs], [t + "\n" * context for _, t in pairs]
        tokens = self.pipeline.sequences.training_rows(targets, prompts, eos=not context,
                                                       device=self.accelerator.device)  # fmt: skip
        item = (self.mapper_inputs(self.lookup(indices), prompts), *tokens)
        if self.config.prefix_text_teacher and taught and not context:
            item += (self.teacher_rows(indices, prompts, *tokens),)
        return item

    def teacher_rows(self, indices: list[int], prompts: list[str], tokens, labels):
        """The text teacher's input for each item: the line the data gives for its question
        (`teacher_lines`) or the image's caption line, as text, then the item's own tokens.
        Only questions are taught: a caption has no caption to read first, and a frame line
        says where objects are, which a caption does not."""
        pipeline, tokenizer = self.pipeline, self.pipeline.tokenizer
        caption_prompt = pipeline.config.caption_prompt
        cue = answer_cue(pipeline.config.question_template)
        rows, starts = [], []
        mask = torch.zeros(tokens.shape)
        on_cpu = tokens.cpu()  # one copy from the device, not one per row
        lengths = scored_ends(labels.cpu())
        for row, (i, prompt, length) in enumerate(zip(indices, prompts, lengths, strict=True)):
            captions = [t for t in self.texts[i] if t.startswith(caption_prompt)]
            first = []
            if captions and prompt and prompt != caption_prompt and prompt.endswith(cue):
                lines = self.teacher_lines
                line = lines[i].get(prompt, captions[0]) if lines else captions[0]
                first = tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
            if len(first) + length > pipeline.max_positions:
                first = []  # the two would not fit in the LM's positions: not taught
            mask[row, :length] = bool(first)
            rows.append(torch.tensor(first + on_cpu[row, :length].tolist()))
            starts.append(max(len(first), 1))  # a row without a teacher is masked out
        ids = pad_sequence(rows, batch_first=True, padding_value=tokenizer.eos_token_id)
        device = tokens.device
        return ids.to(device), torch.tensor(starts, device=device), mask.to(device)

    def clip_items(self, rng) -> tuple:
        """A batch of clips (a quarter of the batch size: a clip row is about four image
        rows long): ("clips", features [B, F, ...], (prompt, text) of each)."""
        count = max(1, self.batch_size // 4)
        indices = [rng.randrange(len(self.clips)) for _ in range(count)]
        texts = [rng.choice(self.clips.texts[i]) for i in indices]
        return "clips", self.clip_features[indices], texts

    def clip_loss(self, lm, mapper, features: torch.Tensor, texts) -> torch.Tensor:
        """The LM's loss on each clip's text after its frames' prefixes (each frame's made
        as for a caption: what `describe_video` reads), laid out by `video_sequence`."""
        pipeline, device = self.pipeline, self.accelerator.device
        clips, frames = features.shape[:2]
        prompts = [pipeline.config.caption_prompt] * (clips * frames)
        prefixes = mapper(*self.mapper_inputs(features.flatten(0, 1), prompts))
        prefixes = prefixes.view(clips, frames, *prefixes.shape[1:])
        table = lm.get_input_embeddings()
        rows, targets = [], []
        for clip, (prompt, text) in zip(prefixes, texts, strict=True):
            ids = pipeline.sequences.text_ids(text, after_image=False)
            ids.append(pipeline.tokenizer.eos_token_id)
            # the room `describe_video` and `answer_video` leave it: frames left out as there
            room = DESCRIPTION_TOKENS if prompt == VIDEO_PROMPT else ANSWER_TOKENS
            try:
                sequence, _ = pipeline.video_sequence(self.clips.times, list(clip), prompt,
                                                      max(room, len(ids)))  # fmt: skip
            except SequenceTooLong:
                continue  # not even one frame and its text fit in the LM's positions
            if len(sequence) + len(ids) > pipeline.max_positions:
                continue
            ids = torch.tensor(ids, device=device)
            rows.append(torch.cat([sequence, table(ids).to(sequence.dtype)]))
            targets.append(torch.cat([ids.new_full((len(sequence),), IGNORE), ids]))
        if not rows:
            return prefixes.sum() * 0.0
        inputs = pad_sequence(rows, batch_first=True)
        labels = pad_sequence(targets, batch_first=True, padding_value=IGNORE)
        return lm(inputs_embeds=inputs, labels=labels, use_cache=False).loss

    def batches(self, start: int):
        """Endless batches from step `start` on: (items, None), (items, context items) or
        a batch of clips (`clip_items`)."""
        config, prefix_length = self.config, self.pipeline.mapper.prefix_length
        rng = random.Random(f"prefix-texts-{config.seed}-{start}")
        seed = f"prefix-{config.seed}-{start}"
        clip_rng = random.Random(f"prefix-clips-{config.seed}-{start}")
        for batch in epoch_batches(len(self.texts), self.batch_size, seed, self.accelerator):
            if self.clip_share and clip_rng.random() < self.clip_share:
                yield self.clip_items(clip_rng)
                continue
            half = len(batch) // 2 if rng.random() < self.context_share else 0
            if half:  # rows of two items: the first half is read before the second
                main = self.items(batch[half : 2 * half], rng, taught=False)
                context = self.items(batch[:half], rng, context=True)
                length = 2 * prefix_length + main[1].shape[1] + context[1].shape[1]
                if length <= self.pipeline.max_positions:
                    yield main, context
                    continue
            yield self.items(batch, rng), None  # (or the two would not fit in the LM's positions)

    def loss(self, module, batch) -> torch.Tensor:
        lm, mapper = self.parts(module)
        if batch[0] == "clips":
            return self.clip_loss(lm, mapper, batch[1], batch[2])
        (inputs, tokens, labels, *teacher), context = batch
        if context is not None:
            context = (mapper(*context[0]), *context[1:])
        if not teacher or context is not None:
            return prefix_loss(lm, mapper(*inputs), tokens, labels, context)
        embeds, targets = prefixed(lm, mapper(*inputs), tokens, labels)
        out = lm(inputs_embeds=embeds, labels=targets, use_cache=False)
        prefix_length = self.pipeline.mapper.prefix_length
        taught = text_teacher_loss(lm, out.logits, prefix_length, *teacher)
        return out.loss + self.config.prefix_text_teacher * taught

    def check(self) -> None:
        """The method's promise: nothing but the mapper learns (the LM too: the ablation)."""
        assert all(p.grad is None for p in self.frozen), "a gradient reached a frozen part"

    @torch.no_grad()
    def validate(self, module) -> float:
        """The loss on every held-out (image, text) pair once."""
        lm, mapper = self.parts(module)
        losses = []
        for start in range(0, len(self.val_pairs), self.batch_size):
            chunk = self.val_pairs[start : start + self.batch_size]
            prompts, targets = [p for _, (p, _) in chunk], [t for _, (_, t) in chunk]
            inputs = self.mapper_inputs(self.val_lookup([i for i, _ in chunk]), prompts)
            tokens, labels = self.pipeline.sequences.training_rows(
                targets, prompts, device=self.accelerator.device
            )
            losses.append(prefix_loss(lm, mapper(*inputs), tokens, labels).item())
        return float(sum(losses) / len(losses))


def train_prefix(
    dataset, encoder: Encoder, lm, tokenizer, config: TrainConfig, accelerator, progress=None
):
    """Stage 3: the mapper, trained through the frozen LM from frozen-encoder features; with
    `progress.sample_every`, a few held-out images captioned as it learns."""
    mapper_options = config.mapper or (
        CLIPCAP_MAPPER if config.lm else MODEL_SIZES[config.size]["mapper"]
    )
    if mapper_options.get("input") == "tokens" and not mapper_options.get("num_tokens"):
        mapper_options = {**mapper_options, "num_tokens": full_grid_tokens(encoder)}
    pipeline = build_pipeline(
        encoder, lm, tokenizer, mapper_options,
        device=accelerator.device, **dataset.pipeline_config(),
    )  # fmt: skip
    recipe = PrefixRecipe(dataset, pipeline, config, accelerator)
    if progress is not None and progress.sample_every:
        progress = dataclasses.replace(progress, samples=_sampler(dataset, pipeline, config))
    module = run_stage(recipe.stage(), config, accelerator, progress=progress)
    pipeline.lm, pipeline.mapper = recipe.parts(module)
    pipeline.lm.requires_grad_(False)
    return pipeline


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
