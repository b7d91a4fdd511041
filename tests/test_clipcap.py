"""ClipCap checkpoints in their published format (built here with random weights) load and
give exactly ClipCap's prefix; a pickle that would run code is refused."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from vlm import Pipeline
from vlm import device as dev
from vlm.tasks import IMAGE_TASKS, UnsupportedTaskError

E = 32  # GPT-2 width of the small stand-in (the format allows any)


@pytest.fixture(scope="module")
def parts(trained, tmp_path_factory):
    """A saved tiny open_clip encoder and a small GPT-2 config + tokenizer folder."""
    root = tmp_path_factory.mktemp("clipcap")
    trained.encoder.save(root / "encoder")
    config = GPT2Config(
        vocab_size=len(trained.tokenizer),
        n_positions=128,
        n_embd=E,
        n_layer=2,
        n_head=2,
        bos_token_id=trained.tokenizer.eos_token_id,
        eos_token_id=trained.tokenizer.eos_token_id,
    )
    config.save_pretrained(root / "gpt2")
    trained.tokenizer.save_pretrained(root / "gpt2")
    return {"encoder": {"model": f"local-dir:{root / 'encoder'}"}, "lm": str(root / "gpt2")}


def gpt_state(lm_dir: str) -> dict[str, torch.Tensor]:
    """GPT-2 weights as ClipCap saved them (transformers 4.1x): with the attention buffers."""
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(lm_dir))
    state = {f"gpt.{k}": v.clone() for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def mlp_checkpoint(path, lm_dir, clip_dim, prefix_length=10):
    """`coco_weights.pt`'s layout: clip_project = MLP((clip_dim, E*k//2, E*k))."""
    hidden = E * prefix_length // 2
    state = gpt_state(lm_dir)
    state["clip_project.model.0.weight"] = torch.randn(hidden, clip_dim) * 0.1
    state["clip_project.model.0.bias"] = torch.randn(hidden) * 0.1
    state["clip_project.model.2.weight"] = torch.randn(E * prefix_length, hidden) * 0.1
    state["clip_project.model.2.bias"] = torch.randn(E * prefix_length) * 0.1
    torch.save(state, path)
    return state


def transformer_checkpoint(path, lm_dir, clip_dim, prefix_length=5, clip_length=3, layers=2):
    """The transformer checkpoint's layout: TransformerMapper(clip_dim, E, k, clip_length, L)."""
    state = gpt_state(lm_dir)
    p = "clip_project."
    state[p + "linear.weight"] = torch.randn(clip_length * E, clip_dim) * 0.1
    state[p + "linear.bias"] = torch.randn(clip_length * E) * 0.1
    state[p + "prefix_const"] = torch.randn(prefix_length, E)
    for i in range(layers):
        q = f"{p}transformer.layers.{i}."
        for norm in ("norm1", "norm2"):
            state[q + norm + ".weight"] = 1 + 0.1 * torch.randn(E)
            state[q + norm + ".bias"] = 0.1 * torch.randn(E)
        state[q + "attn.to_queries.weight"] = torch.randn(E, E) * 0.2
        state[q + "attn.to_keys_values.weight"] = torch.randn(2 * E, E) * 0.2
        state[q + "attn.project.weight"] = torch.randn(E, E) * 0.2
        state[q + "attn.project.bias"] = torch.randn(E) * 0.1
        state[q + "mlp.fc1.weight"] = torch.randn(2 * E, E) * 0.2
        state[q + "mlp.fc1.bias"] = torch.randn(2 * E) * 0.1
        state[q + "mlp.fc2.weight"] = torch.randn(E, 2 * E) * 0.2
        state[q + "mlp.fc2.bias"] = torch.randn(E) * 0.1
    torch.save(state, path)
    return state


def reference_transformer_mapper(state, x, prefix_length, clip_length, layers, heads=8):
    """ClipCap's TransformerMapper forward, written out with einsum as in its train.py."""
    s = {k.removeprefix("clip_project."): v for k, v in state.items()}
    b = x.shape[0]
    h = (x @ s["linear.weight"].T + s["linear.bias"]).view(b, clip_length, E)
    h = torch.cat([h, s["prefix_const"].expand(b, -1, -1)], dim=1)
    for i in range(layers):
        q = f"transformer.layers.{i}."
        ln = torch.nn.functional.layer_norm
        y = ln(h, (E,), s[q + "norm1.weight"], s[q + "norm1.bias"])
        queries = (y @ s[q + "attn.to_queries.weight"].T).view(b, -1, heads, E // heads)
        kv = (y @ s[q + "attn.to_keys_values.weight"].T).view(b, -1, 2, heads, E // heads)
        att = torch.einsum("bnhd,bmhd->bnmh", queries, kv[:, :, 0]) * (E // heads) ** -0.5
        out = torch.einsum("bnmh,bmhd->bnhd", att.softmax(dim=2), kv[:, :, 1]).reshape(b, -1, E)
        h = h + out @ s[q + "attn.project.weight"].T + s[q + "attn.project.bias"]
        y = ln(h, (E,), s[q + "norm2.weight"], s[q + "norm2.bias"])
        y = torch.relu(y @ s[q + "mlp.fc1.weight"].T + s[q + "mlp.fc1.bias"])
        h = h + y @ s[q + "mlp.fc2.weight"].T + s[q + "mlp.fc2.bias"]
    return h[:, clip_length:]


def clipcap_trim(text: str) -> str:
    return (text[: text.index(".") + 1] if "." in text else text).strip()


def clipcap_greedy(pipeline, prefix: torch.Tensor, max_tokens: int) -> str:
    """ClipCap's greedy decoding (predict.py's generate2), written out: the argmax token, fed
    back as an embedding, until "." or the end of text."""
    lm, tokenizer = pipeline.lm, pipeline.tokenizer
    embeds, tokens = prefix, []
    for _ in range(max_tokens):
        token = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        if "." in tokenizer.decode([token]):
            break
        embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return clipcap_trim(tokenizer.decode(tokens))


def test_mlp_checkpoint_loads_and_matches_clipcap(parts, images, tmp_path):
    clip_dim = 32
    state = mlp_checkpoint(tmp_path / "coco_weights.pt", parts["lm"], clip_dim)
    pipeline = Pipeline.from_clipcap(tmp_path / "coco_weights.pt", device="cpu", **parts)
    assert pipeline.mapper.kind == "mlp" and pipeline.mapper.prefix_length == 10
    assert not pipeline.mapper.normalize_input  # ClipCap's predict.py: raw encode_image output
    lm_state = pipeline.lm.state_dict()
    for key, value in state.items():
        if key.startswith("gpt.") and ".attn.bias" not in key and "masked_bias" not in key:
            assert torch.equal(lm_state[key[4:]], value), key
    picture = list(images.values())[0]
    raw = pipeline.encoder.encode_images([picture])
    w0, b0 = state["clip_project.model.0.weight"], state["clip_project.model.0.bias"]
    w2, b2 = state["clip_project.model.2.weight"], state["clip_project.model.2.bias"]
    expected = (torch.tanh(raw @ w0.T + b0) @ w2.T + b2).view(1, 10, E)
    assert torch.allclose(pipeline.prefix([picture]), expected, atol=1e-5)
    assert pipeline.config.stop == ["."]
    # ClipCap's predict.py decodes greedily after the prefix and stops at "."
    assert pipeline.caption([picture], max_new_tokens=5) == [clipcap_greedy(pipeline, expected, 5)]


def test_transformer_checkpoint_loads_and_matches_clipcap(parts, images, tmp_path):
    state = transformer_checkpoint(tmp_path / "transformer.pt", parts["lm"], 32)
    pipeline = Pipeline.from_clipcap(tmp_path / "transformer.pt", device="cpu", **parts)
    mapper = pipeline.mapper
    assert (mapper.kind, mapper.prefix_length, mapper.clip_length) == ("transformer", 5, 3)
    assert mapper.normalize_input  # the transformer notebook normalises the embedding
    picture = list(images.values())[1]
    raw = pipeline.encoder.encode_images([picture])
    expected = reference_transformer_mapper(state, raw / raw.norm(dim=-1, keepdim=True), 5, 3, 2)
    assert torch.allclose(pipeline.prefix([picture]), expected, atol=1e-5)
    assert pipeline.caption([picture], max_new_tokens=4) == [clipcap_greedy(pipeline, expected, 4)]
    beams = pipeline.lm.generate(inputs_embeds=expected, max_new_tokens=4, num_beams=2,
                                 eos_token_id=pipeline.tokenizer.eos_token_id,
                                 pad_token_id=pipeline.tokenizer.eos_token_id)  # fmt: skip
    beam_text = pipeline.tokenizer.decode(beams[0], skip_special_tokens=True)
    assert pipeline.caption([picture], max_new_tokens=4, num_beams=2) == [clipcap_trim(beam_text)]


def test_clipcap_pipeline_saves_and_reloads(parts, images, tmp_path):
    mlp_checkpoint(tmp_path / "coco_weights.pt", parts["lm"], 32)
    pipeline = Pipeline.from_clipcap(tmp_path / "coco_weights.pt", device="cpu", **parts)
    pipeline.save_pretrained(tmp_path / "saved")
    again = Pipeline.from_pretrained(tmp_path / "saved", device="cpu")
    pictures = list(images.values())
    assert torch.allclose(again.prefix(pictures), pipeline.prefix(pictures), atol=1e-6)
    assert again.caption(pictures, max_new_tokens=6) == pipeline.caption(pictures, max_new_tokens=6)


class _Payload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(parts, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"clip_project.model.0.weight": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing"):
        Pipeline.from_clipcap(tmp_path / "evil.pt", device="cpu", **parts)
    assert not marker.exists()


def test_checkpoint_without_a_mapper_is_a_clear_error(parts, tmp_path):
    torch.save(gpt_state(parts["lm"]), tmp_path / "gpt_only.pt")
    with pytest.raises(ValueError, match="clip_project"):
        Pipeline.from_clipcap(tmp_path / "gpt_only.pt", device="cpu", **parts)


# ---------------------------------------------------------------------------- precision policy


def test_decode_precision_policy(monkeypatch):
    """On a bf16 GPU (faked: no GPU is needed to decide) the encoder may autocast, but the
    decode runs in the weights' own dtype unless mixed precision is asked for."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("VLM_PRECISION", raising=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert dev.autocast_dtype(gpu) == torch.bfloat16 and dev.autocast_dtype(cpu) is None
    assert dev.decode_dtype(gpu) is None and dev.decode_dtype(gpu, "fp32") is None
    assert dev.decode_dtype(gpu, "mixed") == torch.bfloat16
    assert dev.decode_dtype(cpu, "mixed") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.decode_dtype(gpu, "mixed") == torch.float16
    monkeypatch.setenv("VLM_PRECISION", "mixed")
    assert dev.decode_dtype(gpu) == torch.float16
    monkeypatch.setenv("VLM_PRECISION", "fp32")
    assert dev.decode_dtype(gpu, "mixed") is None and dev.autocast_dtype(gpu) is None


def _decode_dtypes(pipeline, picture) -> set[torch.dtype]:
    """The dtypes the image tower, the mapper and the LM's head compute in while captioning
    `picture`."""
    seen: set[torch.dtype] = set()
    modules = pipeline.encoder.model.visual, pipeline.mapper, pipeline.lm.get_output_embeddings()
    hooks = [m.register_forward_hook(lambda m, i, out: seen.add(out.dtype)) for m in modules]
    try:
        pipeline.caption([picture], max_new_tokens=3)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.fixture(scope="module")
def random_parts(tmp_path_factory):
    """Like `parts`, with a random (untrained) tiny encoder: a published checkpoint's format
    without waiting for the trained fixtures."""
    from transformers import AutoTokenizer

    from vlm.factory import build_encoder
    from vlm.presets import SHAPEWORLD_DIR
    from vlm.training import MODEL_SIZES

    root = tmp_path_factory.mktemp("clipcap-random")
    torch.manual_seed(0)
    build_encoder(MODEL_SIZES["tiny"]["clip"]).save(root / "encoder")
    tokenizer = AutoTokenizer.from_pretrained(SHAPEWORLD_DIR / "lm")
    eos = tokenizer.eos_token_id
    GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=E, n_layer=2, n_head=2,
               bos_token_id=eos, eos_token_id=eos).save_pretrained(root / "gpt2")  # fmt: skip
    tokenizer.save_pretrained(root / "gpt2")
    return {"encoder": {"model": f"local-dir:{root / 'encoder'}"}, "lm": str(root / "gpt2")}


def test_published_checkpoint_decodes_in_its_own_precision(
    random_parts, images, tmp_path, monkeypatch
):
    """Where mixed precision is available (here: the CPU made to look like a bf16 GPU), a
    ClipCap checkpoint still decodes in fp32, as published; "mixed" is an opt-in."""
    mlp_checkpoint(tmp_path / "coco_weights.pt", random_parts["lm"], 32)
    pipeline = Pipeline.from_clipcap(tmp_path / "coco_weights.pt", device="cpu", **random_parts)
    assert pipeline.config.precision == "fp32"
    monkeypatch.setattr(dev, "half_dtype", lambda device: torch.bfloat16)
    monkeypatch.delenv("VLM_PRECISION", raising=False)
    picture = list(images.values())[0]
    assert _decode_dtypes(pipeline, picture) == {torch.float32}
    monkeypatch.setattr(pipeline.config, "precision", "mixed")
    assert _decode_dtypes(pipeline, picture) == {torch.bfloat16}


# ---------------------------------------------------------------------------- tasks


def test_clipcap_captions_but_does_not_answer(random_parts, images, tmp_path):
    """Its GPT-2 was fine-tuned on captions: questions and few-shot text get a clear error
    that says who can, and the declaration survives save and reload."""
    mlp_checkpoint(tmp_path / "coco_weights.pt", random_parts["lm"], 32)
    pipeline = Pipeline.from_clipcap(tmp_path / "coco_weights.pt", device="cpu", **random_parts)
    assert pipeline.tasks == {"caption", "classify", "search", "explain"}
    picture = list(images.values())[0]
    with pytest.raises(UnsupportedTaskError, match="answer questions.*blip2-opt-2.7b"):
        pipeline.answer([picture], "what is it?")
    with pytest.raises(UnsupportedTaskError, match="few-shot.*shapeworld"):
        pipeline.continue_sequence([picture, "Caption:"])
    pipeline.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["tasks"] == ["caption", "classify", "explain", "search"]
    assert Pipeline.from_pretrained(tmp_path / "saved", device="cpu").tasks == pipeline.tasks


def test_a_folder_without_declared_tasks_does_everything(random_parts, tmp_path):
    """Folders saved before tasks were declared keep working as they did."""
    mlp_checkpoint(tmp_path / "coco_weights.pt", random_parts["lm"], 32)
    pipeline = Pipeline.from_clipcap(tmp_path / "coco_weights.pt", device="cpu", **random_parts)
    pipeline.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["tasks"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert Pipeline.from_pretrained(tmp_path / "old", device="cpu").tasks == IMAGE_TASKS
