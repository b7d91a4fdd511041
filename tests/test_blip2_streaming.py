"""BLIP-2 on a tiny random model in the published layout: its streamed tasks end with the text
of the unstreamed calls; a folder saved in fp16 loads on a CPU in fp32 (as `weights_dtype`
promises) and writes the same tokens; and a saved pipeline is loaded by hub id from a local
Hugging Face cache, offline, giving the folder's captions."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from operator import attrgetter

import pytest
import torch
from conftest import CAPTIONS
from fake_hub import add_files, use_cache
from test_blip2 import QUESTIONS, blip2_folder, photos  # noqa: F401 (fixtures)

from vlm import Pipeline

TOKENS = 12


@pytest.fixture(scope="module")
def blip2(blip2_folder):  # noqa: F811
    return Pipeline.from_pretrained(blip2_folder, device="cpu")


def finished(stream, pipeline, limit: int):
    """Every snapshot of a stream, checked to end in one done snapshot that holds every token
    written: `limit` of them, or fewer up to a stop token."""
    snapshots = list(stream)
    assert snapshots and snapshots[-1].done and not any(s.done for s in snapshots[:-1])
    tokens = [t for t, _ in snapshots[-1].tokens]
    stops = {pipeline.tokenizer.eos_token_id, *pipeline.tokenizer.convert_tokens_to_ids(["\n"])}
    assert len(tokens) == limit or (tokens and tokens[-1] in stops), tokens
    return snapshots


@contextlib.contextmanager
def paced(lm):
    """The LM's forward passes after the first each wait (up to 2 s) until the reader has taken
    a snapshot (it sets the event yielded): how many snapshots a stream gives then does not
    hang on how busy the machine is (under load, a reader that lags gets the tokens that came
    meanwhile in one snapshot, and a tiny model can finish before the reader starts)."""
    taken, calls = threading.Event(), 0

    def wait(module, args):
        nonlocal calls
        calls += 1
        if calls > 1:
            taken.wait(timeout=2)
            taken.clear()

    handle = lm.register_forward_pre_hook(wait)
    try:
        yield taken
    finally:
        handle.remove()


def read(stream, taken: threading.Event):
    for snapshot in stream:
        taken.set()
        yield snapshot


def test_streamed_captions_end_with_the_caption(blip2, photos):  # noqa: F811
    captions = blip2.caption(photos, max_new_tokens=TOKENS)
    assert len(set(captions)) == len(photos) and all(captions), captions  # not degenerate
    for photo, caption in zip(photos, captions, strict=True):
        with paced(blip2.lm) as taken:
            stream = read(blip2.stream_caption(photo, max_new_tokens=TOKENS), taken)
            snapshots = finished(stream, blip2, TOKENS)
        assert snapshots[-1].text == caption
        assert len(snapshots) > 2  # written a piece at a time, not once at the end


def test_streamed_answers_and_chat_end_with_the_answer(blip2, photos):  # noqa: F811
    answers = blip2.answer(photos, QUESTIONS, max_new_tokens=6)
    assert any(answers), answers
    for photo, question, answer in zip(photos, QUESTIONS, answers, strict=True):
        streamed = finished(blip2.stream_answer(photo, question, max_new_tokens=6), blip2, 6)[-1]
        assert streamed.text == answer
        talk = [{"role": "user", "content": [{"type": "image", "image": photo},
                                             {"type": "text", "text": question}]}]  # fmt: skip
        chatted = finished(blip2.stream_chat(talk, max_new_tokens=6), blip2, 6)[-1]
        assert chatted.text == blip2.chat(talk, max_new_tokens=6) == answer


def test_streamed_few_shot_ends_with_the_continuation(blip2, photos):  # noqa: F811
    for query in range(len(photos)):  # each picture the query once, after the other two
        shots = [p for i, p in enumerate(photos) if i != query]
        parts = [shots[0], "a picture\n", shots[1], "another\n", photos[query]]
        expected = blip2.continue_sequence(parts, max_new_tokens=TOKENS)
        streamed = finished(blip2.stream_continue(parts, max_new_tokens=TOKENS), blip2, TOKENS)
        assert streamed[-1].text == expected, query


# ---------------------------------------------------------------------------- fp16


def safetensors_dtypes(folder) -> set[str]:
    """The dtypes of every tensor in a folder's safetensors files (their JSON headers)."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def test_an_fp16_blip2_folder_loads_on_a_cpu_as_the_fp32_weights_rounded(
    blip2,
    photos,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from vlm.blip2 import weights_dtype

    blip2.save_pretrained(tmp_path / "fp32")
    blip2.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert safetensors_dtypes(tmp_path / "fp32") == {"F32"}
    assert safetensors_dtypes(tmp_path / "fp16") == {"F16"}  # half the bytes on disk
    monkeypatch.setenv("VLM_PRECISION", "bf16")  # a GPU setting: a CPU runs fp32 anyway
    assert weights_dtype(torch.device("cpu")) == torch.float32
    half = Pipeline.from_pretrained(tmp_path / "fp16", device="cpu")
    assert {p.dtype for p in half.lm.parameters()} == {torch.float32}
    assert {p.dtype for p in half.encoder.model.parameters()} == {torch.float32}
    full = Pipeline.from_pretrained(tmp_path / "fp32", device="cpu")
    # exactly the fp32 weights rounded to fp16, every one of them (the Q-Former's too)
    for part in ("lm", "mapper", "encoder.model"):
        loaded = attrgetter(part)(half).state_dict()
        rounded = {k: v.half().float() for k, v in attrgetter(part)(full).state_dict().items()}
        assert loaded.keys() == rounded.keys()
        assert all(torch.equal(loaded[k], v) for k, v in rounded.items()), part
    # (the tokens it writes are not compared: this random model's vision tower puts out
    # values near 1e-6 and its LM's choices are near-ties that fp16's rounding flips; a
    # trained model's are not, see the next test)
    assert half.caption(photos, max_new_tokens=4) and half.answer(photos, QUESTIONS)


def test_a_trained_pipeline_saved_in_fp16_writes_the_same_captions(trained, images, tmp_path):
    trained.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert safetensors_dtypes(tmp_path / "fp16") == {"F16"}
    assert safetensors_dtypes(tmp_path / "fp16" / "lm") == {"F16"}
    half = Pipeline.from_pretrained(tmp_path / "fp16", device="cpu")
    assert {p.dtype for p in half.lm.parameters()} == {torch.float32}
    pictures = list(images.values())
    assert half.caption(pictures) == trained.caption(pictures) == CAPTIONS
    assert half.answer(pictures, "what color is it?") == trained.answer(
        pictures, "what color is it?"
    )


@pytest.mark.parametrize(("setting", "dtype"), [
    ("", torch.float16), ("fp16", torch.float16), ("bf16", torch.bfloat16),
    ("fp32", torch.float32), ("BF16", torch.bfloat16),
])  # fmt: skip
def test_on_a_gpu_blip2_loads_in_fp16_unless_vlm_precision_says_otherwise(
    monkeypatch, setting, dtype
):
    from vlm.blip2 import weights_dtype

    monkeypatch.setenv("VLM_PRECISION", setting)
    assert weights_dtype(torch.device("cuda")) == dtype  # asks no GPU: the choice only


# ---------------------------------------------------------------------------- hub id, offline


def test_a_saved_pipeline_loads_by_hub_id_from_the_cache(
    saved_pipeline, image_files, monkeypatch, tmp_path
):
    from vlm.errors import ModelLoadError

    cache = use_cache(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError):  # not cached, offline: one clear error
        Pipeline.from_pretrained("someone/tiny-pipeline", device="cpu")
    files = {str(p.relative_to(saved_pipeline)): p
             for p in saved_pipeline.rglob("*") if p.is_file()}  # fmt: skip
    assert any("/" in name for name in files)  # its encoder/ and lm/ subfolders too
    add_files(cache, "someone/tiny-pipeline", files)
    by_id = Pipeline.from_pretrained("someone/tiny-pipeline", device="cpu")
    folder = Pipeline.from_pretrained(saved_pipeline, device="cpu")
    paths = [image_files[c] for c in CAPTIONS]
    assert by_id.caption(paths) == folder.caption(paths) == CAPTIONS
    assert by_id.answer(paths, "what color is it?") == folder.answer(paths, "what color is it?")
