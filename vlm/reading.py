"""How sure a model is of a text: the frozen LM reads it after the prefix, teacher-forced, and
gives each word its probability, the words it could have put there instead and, where the
encoder has a text tower, how well the text with each of those in its place matches the image
(the calibration's second expert, `vlm.calibration`). A finished text's words then get their
confidence: calibrated where the model has a calibration, else the LM's probability. A
calibration with `views` > 1 has a caption read again on shifted copies of its image
(`shifted_views`) and its words' confidence averaged over them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .calibration import (
    ALTERNATIVE_FLOOR,
    ALTERNATIVES,
    END,
    Alternative,
    Calibration,
    WordReading,
)
from .streaming import Generated, token_ends, word_spans

# (text, how each word reads, each token with its probability) for one sequence
Reading = tuple[str, list[WordReading], list[tuple[int, float]]]

# The image's shifted copies, in this order: by VIEW_SHIFT of its side along each axis, then
# diagonally (a calibration's `views` takes the first views - 1)
VIEW_OFFSETS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))
VIEW_SHIFT = 1 / 32  # 2 pixels of a 64-pixel input, 7 of a 224-pixel one


def shifted_views(pixels: torch.Tensor, views: int) -> list[torch.Tensor]:
    """`views - 1` copies of a batch of preprocessed images [B, C, H, W], each shifted by
    VIEW_SHIFT of its side (edges repeated into the gap): the image seen a few pixels off."""
    if views - 1 > len(VIEW_OFFSETS):
        raise ValueError(f"at most {len(VIEW_OFFSETS) + 1} views, not {views}")
    height, width = pixels.shape[-2:]
    s = max(1, round(VIEW_SHIFT * min(height, width)))
    padded = F.pad(pixels, (s, s, s, s), mode="replicate")
    return [padded[..., s - dy * s : s - dy * s + height, s - dx * s : s - dx * s + width]
            for dx, dy in VIEW_OFFSETS[: views - 1]]  # fmt: skip


def calibrates(calibration: Calibration | None, kind: str) -> bool:
    """Whether `calibration` turns the LM's probabilities of a `kind` of text into calibrated
    ones (captions need its word experts; few-shot continuations have none)."""
    if calibration is None:
        return False
    return kind == "answer" or (kind == "caption" and calibration.calibrates_words)


def finished(text: str, readings: list[WordReading], tokens, calibration: Calibration | None,
             kind: str, views: Sequence[list[WordReading]] = ()) -> Generated:  # fmt: skip
    """A finished text with each word's confidence: calibrated for its `kind` ("caption"
    or "answer") where there is a calibration, else the LM's probability. `views`: how the
    same text reads on the image's shifted copies (a caption's words are averaged over them)."""
    raw = [(r.word, r.probability) for r in readings]
    if not calibrates(calibration, kind):
        return Generated(text, raw, tokens, done=True)
    if kind == "caption":
        shown = calibration.words_over_views([readings, *views])
        words = list(zip([r.word for r in readings], shown, strict=True))
    else:
        words = [(r.word, calibration.answer(r.probability)) for r in readings]
    return Generated(text, words, tokens, done=True, raw_words=raw, calibrated=True)


class WordReader:
    """Reads texts after their sequences for one pipeline: its tokenizer and stop tokens, the
    LM's logits at given tokens (`continuation_logits`), its encoder (for the second expert)
    and how a finished text is trimmed (`trim`)."""

    def __init__(self, tokenizer, encoder, stop_ids: list[int],
                 continuation_logits: Callable, trim: Callable[[str], str]):  # fmt: skip
        self.tokenizer, self.encoder, self.stop_ids = tokenizer, encoder, stop_ids
        self.continuation_logits, self.trim = continuation_logits, trim

    def alternatives(self, probs: torch.Tensor, token: int,
                     can_end: bool = True) -> list[tuple[str, float]]:  # fmt: skip
        """The words the LM could have begun in a word's place instead of `token`: its
        likeliest other first tokens there (at least ALTERNATIVE_FLOOR), each a whole word
        (a word start, as `token` is), with their probabilities; and with `can_end`, ending
        the text there (END: its stop tokens together)."""
        spaced = self.tokenizer.decode([token])[:1].isspace()
        top = probs.topk(min(ALTERNATIVES + 1 + len(self.stop_ids), probs.numel()))
        words: dict[str, float] = {}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if i == token or p < ALTERNATIVE_FLOOR:
                continue
            if i in self.stop_ids:
                if can_end:
                    words[END] = words.get(END, 0.0) + p
                continue
            piece = self.tokenizer.decode([i])
            word = piece.strip()
            if word and piece[:1].isspace() == spaced and any(c.isalnum() for c in word):
                words.setdefault(word, p)
        return sorted(words.items(), key=lambda item: -item[1])[:ALTERNATIVES]

    @torch.inference_mode()
    def read(
        self, sequences: list[torch.Tensor], ids: list[list[int]],
        embeddings: torch.Tensor | None, trim: Callable[[str], str] | None = None,
    ) -> list[Reading]:  # fmt: skip
        """For each sequence continued by its token ids (teacher-forced): the text (decoded,
        then `trim`, default the pipeline's), how the model reads each of its words, and each
        token with its probability. With `embeddings` (each image's, normalised), every word
        that has alternatives gets them, each with the encoder's share for the text with it
        in the word's place among them all (one batch of texts for every word)."""
        trim = trim or self.trim
        rows, checks = [], []
        for row, (token_ids, logits) in enumerate(
            zip(ids, self.continuation_logits(sequences, ids), strict=True)
        ):
            probs = logits.softmax(-1)
            chosen = probs.gather(1, torch.tensor(token_ids, device=probs.device)[:, None])
            chosen = chosen[:, 0].tolist()
            raw = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            text = trim(raw)
            readings = []
            for word, start, end, covering in word_spans(
                text, raw, token_ends(self.tokenizer, token_ids)
            ):
                reading = WordReading(word, math.prod(chosen[i] for i in covering))
                if embeddings is not None and covering:
                    first = covering[0]
                    options = self.alternatives(probs[first], token_ids[first], start > 0)
                    if options:
                        variants = [text[:start].rstrip() if other == END
                                    else text[:start] + other + text[end:]
                                    for other, _ in options]  # fmt: skip
                        checks.append((row, len(readings), [text, *variants]))
                        alternatives = [(word, chosen[first]), *options]
                        reading = WordReading(word, reading.probability, tuple(
                            Alternative(w, p, 0.0) for w, p in alternatives))  # fmt: skip
                readings.append(reading)
            rows.append((text, readings, list(zip(token_ids, chosen, strict=True))))
        if checks:
            self._vote(rows, checks, embeddings)
        return rows

    def _vote(self, rows: list[Reading], checks: list, embeddings: torch.Tensor) -> None:
        """The encoder's share of each checked word's variants, into its alternatives."""
        texts = [t for _, _, variants in checks for t in variants]
        embedded = torch.cat([self.encoder.encode_text(texts[i : i + 256])
                              for i in range(0, len(texts), 256)])  # fmt: skip
        offset = 0
        for row, index, variants in checks:
            similarity = embedded[offset : offset + len(variants)] @ embeddings[row].float()
            offset += len(variants)
            shares = (self.encoder.logit_scale * similarity).softmax(-1).tolist()
            reading = rows[row][1][index]
            rows[row][1][index] = dataclasses.replace(reading, alternatives=tuple(
                dataclasses.replace(a, encoder=share)
                for a, share in zip(reading.alternatives, shares, strict=True)))  # fmt: skip

    def confidence(self, sequence: torch.Tensor, embeddings: torch.Tensor | None,
                   calibration: Calibration | None, kind: str,
                   views: Callable[[], tuple[list, torch.Tensor | None]] | None = None,
                   ):  # fmt: skip
        """The hook a stream runs on each snapshot (see `TextStream`), or None without a
        calibration: live words through the calibration's Platt scaling; the last snapshot
        of a caption read again, teacher-forced, so that its words get both experts, and on
        each of the image's shifted copies that `views()` gives then (their sequences and
        embeddings: made after the caption is written, not before its first word)."""
        if not calibrates(calibration, kind):
            return None

        def confidence(snapshot: Generated) -> Generated:
            if kind == "answer":
                words = [(word, calibration.answer(p)) for word, p in snapshot.words]
                return dataclasses.replace(snapshot, words=words, raw_words=snapshot.words,
                                           calibrated=True)  # fmt: skip
            if not snapshot.done or embeddings is None:  # the experts vote once it is written
                return snapshot
            ids = [token for token, _ in snapshot.tokens]
            _, readings, _ = self.read([sequence], [ids], embeddings)[0]
            copies, embedded = views() if views else ([], None)
            rows = self.read(copies, [ids] * len(copies), embedded) if copies else []
            shifted = [words for _, words, _ in rows]
            final = finished(snapshot.text, readings, snapshot.tokens, calibration, kind, shifted)
            return dataclasses.replace(final, raw_words=snapshot.words)

        return confidence
