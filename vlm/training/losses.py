"""The prefix stage's losses beyond the LM's own next-token loss (`vlm.sequences.prefix_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_teacher_loss(
    lm, logits: torch.Tensor, prefix_length: int, teacher: tuple[torch.Tensor, ...]
):
    """KL(teacher || student), per taught token, of the LM's next-token distributions over
    each row's text: the student is the LM after the visual prefix (`logits` of the prefix and
    the text, [B, prefix_length + n, V]), the teacher the same frozen LM reading the image's
    caption line before the same text.
    `teacher`: (token ids [B, m], where each row's text starts in them [B], mask [B, n])."""
    tokens, starts, mask = teacher
    taught = mask.any(1)  # the teacher reads only the rows it teaches (not captions)
    if not taught.any():
        return logits.new_zeros(())
    tokens, starts, mask = tokens[taught], starts[taught], mask[taught]
    student = logits[taught, prefix_length - 1 : prefix_length - 1 + mask.shape[1]]
    with torch.no_grad():
        read = lm(input_ids=tokens, use_cache=False).logits
        steps = torch.arange(mask.shape[1], device=tokens.device)
        where = (starts[:, None] - 1 + steps).clamp(max=tokens.shape[1] - 1)
        target = read.gather(1, where[..., None].expand(-1, -1, read.shape[-1]))
    kl = F.kl_div(student.float().log_softmax(-1), target.float().log_softmax(-1),
                  log_target=True, reduction="none").sum(-1)  # fmt: skip
    return (kl * mask).sum() / mask.sum().clamp(min=1)
