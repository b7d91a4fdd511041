"""The feature cache keeps features per encoder fingerprint: a run with another image encoder
(other weights) or another mapper input (pooled embedding vs image tokens) never reads features
that were computed for a different one, and a run with the same one reads them back."""

from __future__ import annotations

import pytest
import torch

from vlm import Pipeline
from vlm.data import Example
from vlm.encoder import Encoder
from vlm.features import FeatureCache, fingerprint
from vlm.mapper import PrefixMapper


@pytest.fixture(scope="module")
def examples(image_files) -> list[Example]:
    return [Example(image=str(path), captions=[caption]) for caption, path in image_files.items()]


def with_parts(trained, encoder=None, mapper=None) -> Pipeline:
    return Pipeline(encoder or trained.encoder, trained.lm, trained.tokenizer,
                    mapper or trained.mapper, trained.config, "cpu")  # fmt: skip


def fresh_encoder(saved_pipeline) -> Encoder:
    """The same trained encoder as the fixture's, loaded again (another object)."""
    return Encoder.load({"model": f"local-dir:{saved_pipeline / 'encoder'}"})


def token_mapper(trained, num_tokens: int = 5) -> PrefixMapper:
    width = trained.lm.config.hidden_size
    return PrefixMapper("transformer", trained.encoder.embed_dim, width, 4, num_layers=1,
                        num_heads=4, input="tokens", num_tokens=num_tokens)  # fmt: skip


def test_the_fingerprint_follows_what_the_features_are(trained, saved_pipeline):
    same = with_parts(trained, encoder=fresh_encoder(saved_pipeline))
    assert fingerprint(same) == fingerprint(trained)  # same weights, loaded from elsewhere
    other_mapper = PrefixMapper(**trained.mapper.config)  # other weights, same input
    assert fingerprint(with_parts(trained, mapper=other_mapper)) == fingerprint(trained)

    text_changed = fresh_encoder(saved_pipeline)
    with torch.no_grad():
        text_changed.model.token_embedding.weight.add_(1.0)  # the image features stay the same
    assert fingerprint(with_parts(trained, encoder=text_changed)) == fingerprint(trained)

    image_changed = fresh_encoder(saved_pipeline)
    with torch.no_grad():
        next(image_changed.model.visual.parameters()).view(-1)[0] += 1e-3
    prints = {
        fingerprint(trained),
        fingerprint(with_parts(trained, encoder=image_changed)),
        fingerprint(with_parts(trained, mapper=token_mapper(trained, 5))),
        fingerprint(with_parts(trained, mapper=token_mapper(trained, 10))),
    }
    assert len(prints) == 4


def test_a_cache_is_read_back_only_by_the_encoder_that_filled_it(
    trained, saved_pipeline, examples, tmp_path
):
    keys = [e.content_hash() for e in examples]
    first = FeatureCache(tmp_path, trained)
    first.add(examples, num_workers=0)
    assert first.encoded == 3

    again = FeatureCache(tmp_path, with_parts(trained, encoder=fresh_encoder(saved_pipeline)))
    assert len(again) == 3 and all(key in again for key in keys)
    again.add(examples, num_workers=0)
    assert again.encoded == 0  # read, not encoded
    expected = trained.image_features([e.load() for e in examples])
    torch.testing.assert_close(again.get(keys).float(), expected, atol=2e-3, rtol=2e-3)

    changed = fresh_encoder(saved_pipeline)
    with torch.no_grad():
        for parameter in changed.model.visual.parameters():
            parameter.mul_(1.5)
    other = with_parts(trained, encoder=changed)
    refused = FeatureCache(tmp_path, other)
    assert len(refused) == 0 and not any(key in refused for key in keys)
    refused.add(examples, num_workers=0)
    assert refused.encoded == 3  # computed for this encoder, not taken from the other's
    mine = other.image_features([e.load() for e in examples])
    torch.testing.assert_close(refused.get(keys).float(), mine, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(mine, expected, atol=1e-2)

    tokens = with_parts(trained, mapper=token_mapper(trained))
    by_tokens = FeatureCache(tmp_path, tokens)
    assert len(by_tokens) == 0
    by_tokens.add(examples, num_workers=0)
    assert by_tokens.get(keys).shape == (3, 5, trained.encoder.embed_dim)
    assert len(list(tmp_path.iterdir())) == 3  # one folder per fingerprint


def test_a_built_encoder_and_its_saved_copy_share_a_fingerprint(trained, tmp_path):
    """An encoder as training builds it and the same encoder loaded from its folder compute
    the same features: one fingerprint (the built one keeps its mean and std as tuples, the
    loaded one as lists; the fingerprint once told them apart, so a cache filled by one was
    never read by the other)."""
    from vlm.factory import build_encoder
    from vlm.training import MODEL_SIZES

    built = build_encoder(MODEL_SIZES["tiny"]["clip"])
    built.save(tmp_path / "encoder")
    loaded = Encoder.load({"model": f"local-dir:{tmp_path / 'encoder'}"})
    assert fingerprint(with_parts(trained, encoder=built)) == fingerprint(
        with_parts(trained, encoder=loaded)
    )
