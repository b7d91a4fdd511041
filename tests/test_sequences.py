"""One sequence builder (vlm.sequences) for inference and training: the rows the prefix stage
learns from are what the pipeline asks at inference, token for token, with or without
BLIP-2's BOS after an image."""

from __future__ import annotations

import pytest
import torch
from test_blip2 import opt_like_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from vlm.sequences import IGNORE, Sequences, prefixed


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bos-after-image"])
def sequences(request) -> Sequences:
    tokenizer = opt_like_tokenizer(bos_first=True)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                        n_head=2, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    lm = GPT2LMHeadModel(config).eval()
    return Sequences(lm, tokenizer, bos_after_image=request.param)


@pytest.mark.parametrize("prompt", ["Question: what colour is it? Answer:", "Caption:", ""])
def test_a_training_row_is_what_inference_reads_after_the_image(sequences, prompt):
    prefix = torch.randn(3, 16)
    target = " red"
    tokens, labels = sequences.training_rows([target], [prompt], eos=False, device="cpu")
    inputs, scored = prefixed(sequences.lm, prefix[None], tokens, labels)
    asked = sequences.embed([prefix, prompt], prefix_of=None)  # inference: prefix, then prompt
    torch.testing.assert_close(inputs[0, : len(asked)], asked)
    # what follows the prompt is the target, scored; nothing before it is
    assert (scored[0, : len(asked)] == IGNORE).all()
    assert scored[0, len(asked) :].tolist() == sequences.token_ids(target)


def test_bos_after_an_image_is_honoured_in_training_too(sequences):
    tokens, _ = sequences.training_rows([" a red square"], [""], device="cpu")
    bos = sequences.tokenizer.bos_token_id
    assert (tokens[0, 0].item() == bos) == sequences.bos_after_image
    tokens, _ = sequences.training_rows([" red"], ["Caption:"], device="cpu")
    assert (tokens[0, 0].item() == bos) == sequences.bos_after_image  # the processor's BOS


def test_scores_are_the_lm_s_log_probabilities(sequences):
    prefix = torch.randn(3, 16)
    asked = sequences.embed([prefix, "Caption:"], prefix_of=None)
    ids = sequences.token_ids(" a red")
    with torch.no_grad():
        score = sequences.score([asked], [" a red"], torch.no_grad)
        table = sequences.lm.get_input_embeddings()
        logits = sequences.lm(inputs_embeds=torch.cat([asked, table(torch.tensor(ids))])[None])
    log_probs = logits.logits[0, len(asked) - 1 : -1].log_softmax(-1)
    torch.testing.assert_close(score[0], log_probs.gather(1, torch.tensor(ids)[:, None]).sum())
