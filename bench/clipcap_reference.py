"""ClipCap's inference, re-implemented as the baseline (rmokady/CLIP_prefix_caption).

ClipCap captions one image at a time. Its prefix is the mapper applied to the raw
`encode_image` output, reshaped to (1, prefix_length, d). Then:

- `generate2` (greedy): at every step GPT-2 runs over the WHOLE sequence so far (prefix +
  generated tokens, as embeddings, no KV cache), the last position's logits go through a
  nucleus (top-p) mask that never removes the most likely token, and the argmax is
  appended; it stops after the stop token ('.') or `entry_length` tokens.
- `generate_beam` (beam search, 5 beams): the same full re-forward, now over the beams.
  Candidates are ranked by their cumulative log-probability divided by their length; a beam
  that has produced the stop token can only grow by token 0, at no cost, and stops counting
  length. At the end each beam's score is its sum of log-probs over its length and the best
  one wins.

This is a description of their algorithm written afresh, not their code. The model parts
are the pipeline's own (same encoder, mapper and LM, on the same device, under the same
autocast), so the comparison measures the decoding algorithm only.
"""

from __future__ import annotations

import torch

from vlm.device import autocast


@torch.inference_mode()
def prefix(pipeline, image) -> torch.Tensor:
    """ClipCap's visual prefix for one PIL image: mapper(encode_image(x)) as (1, k, d)."""
    pixels = pipeline.encoder.preprocess(image).unsqueeze(0).to(pipeline.device)
    with autocast(pipeline.device):
        embedding = pipeline.encoder.model.encode_image(pixels).float()
        mapped = pipeline.mapper(embedding).float()
    return mapped.reshape(1, pipeline.mapper.prefix_length, -1)


def _next_logits(lm, embeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole sequence through the LM again; the last position's logits, in fp32."""
    with autocast(device):
        return lm(inputs_embeds=embeds).logits[:, -1, :].float()


@torch.inference_mode()
def generate2(
    pipeline,
    embeds: torch.Tensor,
    stop_ids: set[int],
    entry_length: int = 67,
    top_p: float = 0.8,
    temperature: float = 1.0,
) -> list[int]:
    """Greedy decoding, ClipCap style. Returns the generated token ids (stop included)."""
    lm = pipeline.lm
    table = lm.get_input_embeddings()
    tokens: list[int] = []
    for _ in range(entry_length):
        logits = _next_logits(lm, embeds, pipeline.device) / (temperature or 1.0)
        # ClipCap's nucleus mask: drop the tail beyond top_p of the sorted probabilities,
        # always keeping the first (most likely) token, so the argmax below is unchanged
        ranked, order = logits.sort(descending=True)
        beyond = ranked.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        logits[:, order[beyond]] = float("-inf")
        token = int(logits.argmax(-1))
        tokens.append(token)
        next_embed = table(torch.tensor([[token]], device=embeds.device)).to(embeds.dtype)
        embeds = torch.cat([embeds, next_embed], dim=1)
        if token in stop_ids:
            break
    return tokens


@torch.inference_mode()
def generate_beam(
    pipeline,
    embeds: torch.Tensor,
    stop_ids: set[int],
    beam_size: int = 5,
    entry_length: int = 67,
    temperature: float = 1.0,
) -> list[int]:
    """Beam search, ClipCap style. Returns the best beam's token ids."""
    lm = pipeline.lm
    table = lm.get_input_embeddings()
    device = embeds.device
    stops = torch.tensor(sorted(stop_ids), device=device)
    lengths = torch.ones(beam_size, device=device)  # tokens counted per beam
    finished = torch.zeros(beam_size, dtype=torch.bool, device=device)
    scores = tokens = None  # cumulative log-probs [beams], tokens [beams, t]
    for _ in range(entry_length):
        logprobs = (_next_logits(lm, embeds, pipeline.device) / temperature).softmax(-1).log()
        if scores is None:  # first step: the one sequence branches into the best tokens
            scores, next_tokens = logprobs[0].topk(beam_size)
            embeds = embeds.expand(beam_size, -1, -1)
            tokens = next_tokens[:, None]
        else:
            logprobs[finished] = float("-inf")
            logprobs[finished, 0] = 0.0  # a finished beam only grows by token 0, for free
            totals = scores[:, None] + logprobs  # [beams, vocab]
            lengths[~finished] += 1
            average = (totals / lengths[:, None]).view(-1)
            best, flat = average.topk(beam_size)
            vocab = logprobs.shape[-1]
            source, next_tokens = flat // vocab, flat % vocab
            lengths, finished = lengths[source], finished[source]
            tokens = torch.cat([tokens[source], next_tokens[:, None]], dim=1)
            embeds = embeds[source]
            scores = best * lengths
        embeds = torch.cat([embeds, table(next_tokens)[:, None].to(embeds.dtype)], dim=1)
        finished = finished | torch.isin(next_tokens, stops)
        if finished.all():
            break
    winner = int((scores / lengths).argmax())
    return tokens[winner, : int(lengths[winner])].tolist()


def caption_ids(pipeline, image, stop_ids: set[int], entry_length: int, beams: int = 1):
    """ClipCap's whole per-image path: prefix, then greedy or beam decoding."""
    embeds = prefix(pipeline, image)
    if beams == 1:
        return generate2(pipeline, embeds, stop_ids, entry_length)
    return generate_beam(pipeline, embeds, stop_ids, beams, entry_length)
