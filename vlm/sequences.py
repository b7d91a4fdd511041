"""Prefix + text as the frozen LM reads it: one place for how visual prefixes and text become
LM input embeddings, masks and positions, padded, scored and (in training) labelled.

`Pipeline` builds its prompts and scores its continuations here; the trainer builds its
prefix-stage rows and losses here; both follow the same rule for the text after an image
(`Sequences.text_ids`), so what a mapper is trained on is what it is asked at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import SequenceTooLong

IGNORE = -100  # the label of a position that is not scored (transformers' ignore_index)


class Sequences:
    """How one LM and its tokenizer read prefixes and text.

    `bos_after_image` (BLIP-2's prompt format, `PipelineConfig.bos_after_image`): the text
    right after an image is tokenized with the tokenizer's special tokens, as `Blip2Processor`
    writes it (OPT's tokenizer starts it with BOS, another may not), and an image with no text
    after it is followed by the LM's BOS, as `Blip2ForConditionalGeneration.generate` starts a
    caption."""

    def __init__(self, lm, tokenizer, bos_after_image: bool = False):
        self.lm, self.tokenizer, self.bos_after_image = lm, tokenizer, bos_after_image

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def max_positions(self) -> int:
        """How many positions the LM reads (the size of its position table; 2**30 if none)."""
        return getattr(self.lm.config, "max_position_embeddings", None) or 1 << 30

    def room(self, length: int, need: int = 1) -> int:
        """How many more tokens the LM can read after `length`, or SequenceTooLong if fewer
        than `need`. Going past it fails with an IndexError, on a GPU with a device-side
        assert that breaks every later request."""
        limit = self.max_positions
        if length + need > limit:
            raise SequenceTooLong(
                f"the text is too long for this model: {length} tokens with the image prefix; "
                f"it reads at most {limit}"
            )
        return limit - length

    # ------------------------------------------------------------------ token ids

    def token_ids(self, text: str) -> list[int]:
        """`text`'s token ids, no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def text_ids(self, text: str, after_image: bool) -> list[int]:
        """The token ids of a piece of text as the LM reads it, right after an image or not:
        the one rule inference and training share."""
        if self.bos_after_image and after_image:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        return self.token_ids(text)

    def _bos(self) -> int:
        bos = getattr(self.lm.config, "bos_token_id", None)
        return self.tokenizer.bos_token_id if bos is None else bos

    def image_end_ids(self, text_follows: bool) -> list[int]:
        """What the LM reads between an image and what comes next (with `bos_after_image`,
        BOS where no text follows the image; else nothing)."""
        return [self._bos()] if self.bos_after_image and not text_follows else []

    # ------------------------------------------------------------------ inference

    def embed(self, parts: Sequence, prefix_of: Callable[[object], torch.Tensor]) -> torch.Tensor:
        """One sequence of LM input embeddings [L, d] from prefixes (tensors [k, d]), images
        (turned into prefixes by `prefix_of`) and text, in order."""
        table = self.lm.get_input_embeddings()
        device, dtype = table.weight.device, table.weight.dtype
        words = lambda ids: table(torch.tensor(ids, device=device))  # noqa: E731
        pieces, after_image = [], False
        for part in parts:
            if isinstance(part, str):
                if part:
                    pieces.append(words(self.text_ids(part, after_image)))
                    after_image = False
                continue
            if after_image and (end := self.image_end_ids(text_follows=False)):
                pieces.append(words(end))  # two images in a row: the first one's BOS
            prefix = part if isinstance(part, torch.Tensor) else prefix_of(part)
            pieces.append(prefix.to(device, dtype))
            after_image = True
        if after_image and (end := self.image_end_ids(text_follows=False)):
            pieces.append(words(end))
        return torch.cat(pieces)

    def left_pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack [L_i, d] embeddings into [B, L, d] padded on the left, plus attention mask."""
        length = max(s.shape[0] for s in sequences)
        embeds = sequences[0].new_zeros(len(sequences), length, sequences[0].shape[1])
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=embeds.device)
        for i, s in enumerate(sequences):
            embeds[i, length - s.shape[0] :] = s
            mask[i, length - s.shape[0] :] = 1
        return embeds, mask

    def prompt_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's token ids on its own, right-padded [B, T], and which are tokens [B, T]
        (an empty prompt reads as EOS): what a mapper that reads the prompt is given."""
        ids = [self.token_ids(p.strip()) or [self.tokenizer.eos_token_id] for p in prompts]
        length = max(len(i) for i in ids)
        self.room(length, need=0)
        tokens = torch.zeros(len(ids), length, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(ids), length, dtype=torch.bool, device=self.device)
        for row, i in enumerate(ids):
            tokens[row, : len(i)] = torch.tensor(i, device=self.device)
            mask[row, : len(i)] = True
        return tokens, mask

    def continuation_logits(
        self, sequences: list[torch.Tensor], ids: list[list[int]], autocast
    ) -> list[torch.Tensor]:
        """Teacher-forced: each sequence followed by its token ids through the LM at once;
        for each, the LM's logits [n_i, V] (float) at each of those tokens (the position
        before a token predicts it). `autocast`: the decode's precision context."""
        table = self.lm.get_input_embeddings()
        full = [
            torch.cat([s, table(torch.tensor(i, dtype=torch.long, device=self.device))])
            for s, i in zip(sequences, ids, strict=True)
        ]
        embeds, mask = self.left_pad(full)
        self.room(embeds.shape[1], need=0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast():
            logits = self.lm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions
            ).logits
        length = logits.shape[1]
        return [logits[row, length - len(i) - 1 : length - 1].float() for row, i in enumerate(ids)]

    def score(
        self, sequences: list[torch.Tensor], continuations: list[str], autocast
    ) -> torch.Tensor:
        """Sum of the LM's log-probabilities of each continuation after its sequence."""
        ids = [self.token_ids(c) for c in continuations]
        scores = []
        for logits, token_ids in zip(
            self.continuation_logits(sequences, ids, autocast), ids, strict=True
        ):
            target = torch.tensor(token_ids, device=self.device)
            scores.append(logits.log_softmax(-1).gather(1, target[:, None]).sum())
        return torch.stack(scores)

    # ------------------------------------------------------------------ training

    def training_rows(
        self, texts: list[str], prompts: list[str] | None = None, eos: bool = True, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the prefix stage trains on, each read right after an image: token ids of
        `prompt + text (+ eos)` as `text_ids` gives them, right-padded [B, T], and labels that
        score only the text and its eos (the prompt is given at inference, so it is not
        learned). `eos=False`: the text is not the end (more follows it in the row)."""
        end = [self.tokenizer.eos_token_id] if eos else []
        prompts = prompts or [""] * len(texts)
        rows = []
        for prompt, text in zip(prompts, texts, strict=True):
            first = self.text_ids(prompt, after_image=True) if prompt else []
            start = first + self.image_end_ids(text_follows=bool(prompt))
            target = self.text_ids(text, after_image=not start) + end
            rows.append((start, target))
        length = max(len(p) + len(t) for p, t in rows)
        tokens = torch.full((len(rows), length), self.tokenizer.eos_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for i, (start, target) in enumerate(rows):
            tokens[i, : len(start) + len(target)] = torch.tensor(start + target)
            labels[i, len(start) : len(start) + len(target)] = torch.tensor(target)
        device = self.device if device is None else device
        return tokens.to(device), labels.to(device)


def prefixed(lm, prefix: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor):
    """(LM input embeddings, labels) of visual prefixes [B, k, d] followed by their rows of
    tokens and labels (`Sequences.training_rows`); the prefix is not scored."""
    table = lm.get_input_embeddings()
    inputs = torch.cat([prefix.to(table.weight.dtype), table(tokens)], dim=1)
    ignore = labels.new_full((labels.shape[0], prefix.shape[1]), IGNORE)
    return inputs, torch.cat([ignore, labels], dim=1)


def scored_ends(labels: torch.Tensor) -> list[int]:
    """Where each row's scored text ends (one past its last label that is not ignored; 0 if
    none): what comes after is padding."""
    positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
    return torch.where(labels != IGNORE, positions, 0).amax(1).tolist()


def prefix_loss(lm, prefix: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                context: tuple[torch.Tensor, ...] | None = None):  # fmt: skip
    """The LM's next-token loss on the text after the visual prefix (none on the prefix).

    `context`: (prefix, tokens, labels) of an item that each row reads first, up to its last
    scored token (no padding between the two), and is scored on too: a prefix read after
    other text, as in a k-shot list."""
    inputs, targets = prefixed(lm, prefix, tokens, labels)
    if context is not None:
        before, before_targets = prefixed(lm, *context)
        ends = scored_ends(before_targets)
        cut = [(before[i, :end], before_targets[i, :end]) for i, end in enumerate(ends)]
        rows = zip(cut, inputs, targets, strict=True)
        inputs, targets = zip(*[(torch.cat([b, x]), torch.cat([t, y])) for (b, t), x, y in rows],
                              strict=True)  # fmt: skip
        inputs = pad_sequence(list(inputs), batch_first=True)
        targets = pad_sequence(list(targets), batch_first=True, padding_value=IGNORE)
    return lm(inputs_embeds=inputs, labels=targets, use_cache=False).loss
