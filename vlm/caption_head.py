"""CoCa's captioning decoder (Yu et al. 2022) as the CLIP stage trains it beside the
contrastive loss: a model part that lives only while the encoder trains (and in the stage's
checkpoints, where experiments/coca_ceiling.py reads it back)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer


class CaptionHead(torch.nn.Module):
    """CoCa's captioning decoder (Yu et al. 2022), used only while the encoder trains: it reads
    the ViT's patch tokens and must write the canonical caption, so every object's attributes
    have to survive in those tokens, not just enough of them to tell a batch apart. It is
    open_clip's `MultimodalTransformer` over a small vocabulary: the tokens the captions use."""

    def __init__(self, vocabulary: list[int], width: int, layers: int, context_length: int):
        super().__init__()
        lookup = torch.zeros(max(vocabulary) + 1, dtype=torch.long)  # open_clip id -> ours
        lookup[torch.tensor(vocabulary)] = torch.arange(len(vocabulary))
        self.register_buffer("lookup", lookup, persistent=False)
        self.register_buffer("vocabulary", torch.tensor(vocabulary))  # kept in checkpoints
        self.embedding = torch.nn.Embedding(len(vocabulary), width)
        self.position = torch.nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.decoder = MultimodalTransformer(
            width=width, layers=layers, heads=max(1, width // 32), context_length=context_length,
            output_dim=len(vocabulary),
        )  # fmt: skip
        # (its own init_parameters() is broken in open_clip 3; the projection starts empty)
        torch.nn.init.normal_(self.decoder.text_projection, std=width**-0.5)

    def forward(self, patch_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token loss of `tokens` (open_clip ids, 0-padded) given the image's patches."""
        ids = self.lookup[tokens]  # padding (0) maps to a real id, but is never a target
        inputs = self.embedding(ids[:, :-1]) + self.position[: ids.shape[1] - 1]
        logits = self.decoder(patch_tokens, inputs)
        targets = ids[:, 1:].masked_fill(tokens[:, 1:] == 0, -100)
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)

    @torch.no_grad()
    def generate(self, patch_tokens: torch.Tensor, start: int, end: int) -> list[list[int]]:
        """Greedy captions of the images (open_clip ids between `start` and `end`): what the
        encoder's patch tokens say, read by the decoder that trained with them."""
        ids = self.lookup.new_full((patch_tokens.shape[0], 1), int(self.lookup[start]))
        ended = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(self.position.shape[0] - 1):
            inputs = self.embedding(ids) + self.position[: ids.shape[1]]
            next_ids = self.decoder(patch_tokens, inputs)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            ended |= next_ids[:, 0] == self.lookup[end]
            if ended.all():  # every caption has its end: the rest would be cut off anyway
                break
        captions = []
        for row in self.vocabulary[ids[:, 1:]].tolist():
            captions.append(row[: row.index(end)] if end in row else row)
        return captions


def caption_vocabulary(tokenizer, captions: list[str]) -> list[int]:
    """CaptionHead's vocabulary: the open_clip ids the captions use, and padding (0)."""
    return sorted(set(tokenizer(captions).unique().tolist()) | {0})
