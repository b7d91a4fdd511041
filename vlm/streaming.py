"""Live text: a frozen LM's `generate` streamed as it runs, with how sure the LM was of each word.

`TextStream` runs `lm.generate` in a background thread and yields `Generated` snapshots: the
text so far, trimmed exactly as the finished text will be, and each word with its probability.
Greedy decoding and sampling stream token by token (transformers' streamer: `generate` hands
each new token to `put`); beam search cannot stream (a beam's words change until the search
ends), so it yields the winning beam once, when it is done.

A word's raw probability is the product of its tokens' probabilities under the LM's own
softmax (its raw logits, before temperature or top-p): the chance the LM gave to writing that
word there, whatever decoding then picked. A model with a calibration turns it into the chance
that the word is right (`vlm.calibration`): the stream's `confidence` hook does that to each
snapshot, and `raw_words` keeps the LM's own numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

_DONE = object()
# The threads `generate` runs in, kept from one stream to the next: a new thread for each
# stream made torch build a new team of worker threads for it (OpenMP's are per calling
# thread), which cost 20-25% of a 20-token GPT-2 caption on 2 CPU cores (bench: stream).
_GENERATORS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlm-generate")


@dataclasses.dataclass
class Generated:
    """What the LM has written so far."""

    text: str  # trimmed and stripped as the finished text will be
    # each word of `text` and how sure the model is of it: the chance it is right where the
    # model is calibrated (`calibrated`), else the LM's probability (as in `raw_words`)
    words: list[tuple[str, float]]
    tokens: list[tuple[int, float]]  # every generated token id and its probability
    done: bool = False
    raw_words: list[tuple[str, float]] | None = None  # the LM's own (None: as `words`)
    calibrated: bool = False

    def __post_init__(self):
        if self.raw_words is None:
            self.raw_words = list(self.words)

    def spans(self) -> list[tuple[str, float | None]]:
        """`text` cut into words (with their probability) and the spaces between them (None):
        joined, the pieces give `text` back. What `gr.HighlightedText` shows."""
        pieces: list[tuple[str, float | None]] = []
        position, words = 0, iter(self.words)
        for match in re.finditer(r"\S+", self.text):
            if match.start() > position:
                pieces.append((self.text[position : match.start()], None))
            pieces.append((match.group(), next(words)[1]))
            position = match.end()
        if position < len(self.text):
            pieces.append((self.text[position:], None))
        return pieces


def word_spans(text: str, raw: str, token_ends: list[int]) -> list[tuple[str, int, int, list[int]]]:
    """Each word of `text`, a trimmed part of `raw` (the decoded tokens), with where it starts
    and ends in `text` and the indices of the tokens that overlap it; token i covers
    raw[token_ends[i-1]:token_ends[i]]."""
    offset = raw.find(text) if text else 0
    spans = []
    for match in re.finditer(r"\S+", text):
        start, end = offset + match.start(), offset + match.end()
        covering, begin = [], 0
        for i, stop in enumerate(token_ends):
            if begin < end and stop > start and stop > begin:  # the token overlaps the word
                covering.append(i)
            begin = stop
        spans.append((match.group(), match.start(), match.end(), covering))
    return spans


def word_probabilities(
    text: str, raw: str, token_ends: list[int], probs: list[float]
) -> list[tuple[str, float]]:
    """(word, probability) for each word of `text`, a trimmed part of `raw` (the decoded
    tokens); token i covers raw[token_ends[i-1]:token_ends[i]]. A word's probability is the
    product of the probabilities of the tokens that overlap it."""
    if len(probs) != len(token_ends):
        raise ValueError(f"{len(token_ends)} token ends but {len(probs)} probabilities")
    return [(word, math.prod(probs[i] for i in tokens))
            for word, _, _, tokens in word_spans(text, raw, token_ends)]  # fmt: skip


def token_ends(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text ends in the decoded text of `ids` (special tokens skipped)."""
    return [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]


class _Cancelled(StoppingCriteria):
    """Stops `generate` at the next token once the reader has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TextStream(BaseStreamer):
    """Iterate over `Generated` snapshots while `lm.generate(**options)` runs in a thread.

    `options` are the keyword arguments of one `generate` call on a batch of one; `trim` is
    what turns decoded text into the finished text (stop strings, stripping), and
    `precision` the context the call runs in (the pipeline's decode precision), so the last
    snapshot's text is exactly what the same call without streaming gives. `confidence`, if
    given, turns each snapshot's raw word probabilities into calibrated ones (in the reader's
    thread; the last snapshot once generation is over). Stopping the
    iteration early (closing it) stops the generation at its next token. Errors raised in
    the thread are raised again in the reader's."""

    def __init__(
        self,
        lm,
        tokenizer,
        options: dict,
        trim: Callable[[str], str],
        precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        confidence: Callable[[Generated], Generated] | None = None,
    ):
        if options["inputs_embeds"].shape[0] != 1:
            raise ValueError("a TextStream generates one text at a time")
        self.lm, self.tokenizer, self.trim, self.precision = lm, tokenizer, trim, precision
        self.confidence = confidence
        self.beams = options.get("num_beams", 1) > 1
        self._items: queue.Queue = queue.Queue()
        self._logits: deque[torch.Tensor] = deque()  # the LM's last-position logits, per step
        self._prompt_seen = False
        self._cancel = threading.Event()
        self._done = _GENERATORS.submit(self._run, options)

    # ------------------------------------------------------------ generate's thread

    def _run(self, options: dict) -> None:
        me = threading.get_ident()

        def record(module, args, output) -> None:  # only this stream's calls: the LM is shared
            if threading.get_ident() == me:
                self._logits.append(output.logits[0, -1].to(torch.float32, copy=True))

        hook = None if self.beams else self.lm.register_forward_hook(record)
        stop = StoppingCriteriaList([_Cancelled(self._cancel)])
        try:
            with torch.inference_mode(), self.precision():
                if self.beams:  # beams don't stream: score the winner once it is known
                    out = self.lm.generate(
                        **options, stopping_criteria=stop, return_dict_in_generate=True,
                        output_logits=True,
                    )  # fmt: skip
                    scores = self.lm.compute_transition_scores(
                        out.sequences, out.logits, out.beam_indices, normalize_logits=True
                    )
                    tokens = out.sequences[0, -scores.shape[1] :].tolist()
                    self._items.put(list(zip(tokens, scores[0].exp().tolist(), strict=True)))
                else:
                    self.lm.generate(**options, stopping_criteria=stop, streamer=self)
            self._items.put(_DONE)
        except BaseException as error:  # noqa: BLE001 (handed to the reader, raised there)
            self._items.put(error)
        finally:
            if hook is not None:
                hook.remove()

    def put(self, value: torch.Tensor) -> None:
        """Called by `generate`: first the prompt's ids (none here: it reads embeddings), then
        each new token, after the LM's forward pass that chose it."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        token = int(value.reshape(-1)[0])
        logits = self._logits.popleft()
        prob = logits.softmax(-1)[token].item()
        self._items.put([(token, prob)])

    def end(self) -> None:
        """Called by `generate` when it is done; the thread says so once `generate` returns."""

    # ------------------------------------------------------------ the reader's thread

    def __iter__(self) -> Iterator[Generated]:
        tokens: list[tuple[int, float]] = []
        ends: list[int] = []  # where each token's text ends in the decoded text
        raw, shown = "", None
        try:
            while True:
                items = [self._items.get()]
                while not self._items.empty():  # catch up: one snapshot for all that came
                    items.append(self._items.get_nowait())
                done = items[-1] is _DONE
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is not _DONE:
                        for token, prob in item:
                            tokens.append((token, prob))
                            raw = self.tokenizer.decode(
                                [t for t, _ in tokens], skip_special_tokens=True
                            )
                            ends.append(len(raw))
                if raw.endswith("\ufffd") and not done:  # half a character: wait for the rest
                    continue
                text = self.trim(raw)
                if text == shown and not done:
                    continue
                shown = text
                words = word_probabilities(text, raw, ends, [p for _, p in tokens])
                snapshot = Generated(text, words, list(tokens), done)
                yield self.confidence(snapshot) if self.confidence else snapshot
                if done:
                    return
        finally:
            self._cancel.set()

    def final(self) -> Generated:
        """Run to the end; the finished text."""
        *_, last = self
        return last


def print_stream(stream: Iterator[Generated], label: str = "", file=None) -> Generated:
    """Print `label` then the text as it is written, on one line; returns the finished text."""
    file = file or sys.stdout
    shown, written = "", None
    print(label, end="", file=file, flush=True)
    for written in stream:
        if written.text.startswith(shown):
            print(written.text[len(shown) :], end="", file=file, flush=True)
        else:  # the text changed behind the cursor (a stop string cut it): write it again
            print("\r" + label + written.text, end="", file=file, flush=True)
        shown = written.text
    print(file=file)
    return written
