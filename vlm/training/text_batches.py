"""Text as the trainer feeds it to the LM: documents packed into blocks with their answer
tokens marked (the LM stage), and the (prompt, target) split of a prefix-stage text (whose
rows `vlm.sequences.Sequences.training_rows` builds)."""

from __future__ import annotations

import math

import torch

from ..prompts import FRAME_PROMPT, answer_cue


def split_prompt(text: str, config) -> tuple[str, str]:
    """(prompt, target) of a prefix-stage text: the task prompt the pipeline will give at
    inference ("Caption:", "Question: … Answer:") and what the LM must produce after it."""
    cue = answer_cue(config.question_template)
    if config.caption_prompt and text.startswith(config.caption_prompt):
        return config.caption_prompt, text[len(config.caption_prompt) :]
    if frame := FRAME_PROMPT.match(text):  # a frame line, after the frame's timestamp
        return frame.group(), text[frame.end() :]
    if cue and cue in text:
        cut = text.rindex(cue) + len(cue)
        return text[:cut], text[cut:]
    return "", text


def pack_texts(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """GPT-style packing: all texts, each ended by EOS, cut into [N, block_size] blocks, so
    the LM learns to read text at every position (after a visual prefix, too)."""
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += row + [tokenizer.eos_token_id]
    blocks = len(ids) // block_size
    return torch.tensor(ids[: blocks * block_size]).view(blocks, block_size)


def _rows_in(windows: torch.Tensor, rows: torch.Tensor, base: int) -> torch.Tensor:
    """Which windows [..., L] of token ids (< `base`) equal one of `rows` [m, L], exactly.
    Each chunk of ids that fits in 62 bits is read as one integer in base `base`, then replaced
    by its rank among the rows' chunks, so windows of any length cost one pass per chunk."""
    chunk = max(1, int(62 / math.log2(base + 1)))
    hit = torch.ones(windows.shape[:-1], dtype=torch.bool)
    code_w = torch.zeros(windows.shape[:-1], dtype=torch.long)
    code_r = torch.zeros(len(rows), dtype=torch.long)
    for start in range(0, windows.shape[-1], chunk):
        weights = base ** torch.arange(min(chunk, windows.shape[-1] - start))
        part_w = (windows[..., start : start + chunk] * weights).sum(-1)
        part_r = (rows[:, start : start + chunk] * weights).sum(-1)
        known = torch.unique(part_r)  # sorted
        rank_w = torch.searchsorted(known, part_w).clamp(max=len(known) - 1)
        hit &= known[rank_w] == part_w
        joint_r = code_r * len(known) + torch.searchsorted(known, part_r)
        joint_w = code_w * len(known) + rank_w
        known = torch.unique(joint_r)  # ranks again, so codes stay below len(rows)
        code_r = torch.searchsorted(known, joint_r)
        code_w = torch.searchsorted(known, joint_w).clamp(max=len(known) - 1)
        hit &= known[code_w] == joint_w
    return hit


def answer_mask(tokenizer, blocks: torch.Tensor, cue: str, more_cues=()) -> torch.Tensor:
    """True at the tokens of every answer in packed `blocks`: those after `cue` (" Answer:")
    or after one of `more_cues` (exact text, e.g. a k-shot list's "Colour:") up to the newline
    or EOS that ends it. Nothing is marked when there is no cue. Thousands of cues cost one
    pass per cue length (`_rows_in`)."""
    cues = ([" " + cue] if cue else []) + list(more_cues)
    after_cue = torch.zeros_like(blocks, dtype=torch.bool)  # the token before ends the cue
    if not cues:
        return after_cue
    in_cue = torch.zeros_like(after_cue)
    by_length: dict[int, list[list[int]]] = {}
    for text in cues:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(ids), []).append(ids)
    for length, group in by_length.items():
        windows = blocks.unfold(1, length, 1)  # [n, positions - length + 1, length]
        found = _rows_in(windows, torch.tensor(group), len(tokenizer))
        after_cue[:, length:] |= found[:, :-1]
        for j in range(length):  # "Tag -" ends inside "Tag ->": its ">" is no answer
            in_cue[:, j : j + found.shape[1]] |= found
    vocab = tokenizer.get_vocab()
    ends = [i for t, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([t])]
    ends = torch.tensor([*ends, tokenizer.eos_token_id])
    n, length = blocks.shape
    positions = torch.arange(length).expand(n, length)
    last = lambda marks: torch.where(marks, positions, -1).cummax(1).values  # noqa: E731
    return (last(after_cue) > last(torch.isin(blocks, ends))) & ~in_cue
