"""The demo's options through its API, on ONE server started with a password (--auth), a
small session capacity (VLM_MAX_SESSIONS) and a small length limit (VLM_MAX_NEW_TOKENS): the
decoding modes, the length limit, a batch of files with bad ones among them, few-shot
continuations, and that a visitor without the password gets nothing."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import ImageFilter
from test_app import CAPTION, start_app
from test_bad_inputs import make_text_jpg, make_truncated_jpeg

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.examples import photo_examples, shapeworld_examples

AUTH = ("tester", "s3cret:with-colon")
MAX_SESSIONS, MAX_NEW_TOKENS = 3, 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app-options")
    env = {"VLM_MAX_SESSIONS": str(MAX_SESSIONS), "VLM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}
    process, url, _ = start_app(tmp, "--auth", ":".join(AUTH), env=env)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, auth=AUTH, verbose=False)


@pytest.fixture(scope="module")
def bundled():
    """The same model in this process, to say what the server must answer."""
    return Pipeline.from_pretrained("shapeworld", device="cpu")


@pytest.fixture(scope="module")
def example():
    return next((p, t) for p, t in shapeworld_examples() if " left of " not in t["caption"])


def caption(client, path, mode="greedy", beams=3, top_p=0.9, temperature=1.0, max_tokens=30):
    return client.predict(handle_file(str(path)), mode, beams, top_p, temperature, max_tokens,
                          api_name="/caption")  # fmt: skip


# ---------------------------------------------------------------------------- --auth


def test_without_the_password_nothing_is_served(server, example):
    assert httpx.get(server + "config").status_code == 401
    assert httpx.get(server + "gradio_api/info").status_code == 401
    wrong = httpx.post(server + "login", data={"username": AUTH[0], "password": "guess"})
    assert wrong.status_code == 400 or wrong.status_code == 401
    with pytest.raises(Exception):  # noqa: B017 (gradio_client's error type varies)
        Client(server, verbose=False).predict(handle_file(str(example[0])), api_name="/caption")


def test_with_the_password_it_serves(client, example):
    path, truth = example
    assert caption(client, path) == truth["caption"]


# ---------------------------------------------------------------------------- decoding


def test_beam_search_gives_the_library_s_beam_caption(client, bundled):
    for path, _ in shapeworld_examples()[:4]:
        expected = bundled.caption(path, num_beams=4)[0]
        assert caption(client, path, "beam search", beams=4) == expected


def test_beam_search_is_not_greedy_search(client, bundled, tmp_path):
    """On its own scenes the bundle's beam and greedy captions agree; blurred, a few scenes
    (2 of these 40 when written) get a different beam caption: the page must give that one."""
    rng = random.Random(5)
    scenes = [sw.sample_scene(rng, 3, split="any") for _ in range(40)]
    images = [sw.render(s).filter(ImageFilter.GaussianBlur(5)) for s in scenes]
    greedy, beam = bundled.caption(images), bundled.caption(images, num_beams=4)
    differ = [i for i in range(len(images)) if greedy[i] != beam[i]]
    assert differ, "no scene where beam search changes the caption"
    for i in differ:
        images[i].save(tmp_path / f"blurred-{i}.png")
        assert caption(client, tmp_path / f"blurred-{i}.png", "beam search", beams=4) == beam[i]
        assert caption(client, tmp_path / f"blurred-{i}.png") == greedy[i]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("greedy", dict(max_new_tokens=7)),
        ("beam search", dict(max_new_tokens=7, num_beams=5)),
        ("nucleus sampling", dict(max_new_tokens=7, do_sample=True, top_p=0.8, temperature=0.6)),
    ],
)
def test_each_mode_passes_its_options_to_the_pipeline(mode, expected, example, monkeypatch):
    """The bundled model's beam captions equal its greedy ones on every bundled example, so
    the API cannot tell them apart: the options the handler hands the pipeline are checked."""
    import app
    from vlm.streaming import Generated

    models = app.Models("shapeworld")
    calls = []

    def stream_caption(image, **kw):  # the handler streams: record what it asks for
        calls.append(kw)
        return iter([Generated("x", [("x", 0.5)], [(0, 0.5)], done=True)])

    monkeypatch.setattr(models.get(None), "stream_caption", stream_caption)
    handlers = app.make_handlers(models, example[0].parent)
    assert handlers["caption"](str(example[0]), mode, 5, 0.8, 0.6, 7) == "x"
    assert calls == [expected]


def test_nucleus_sampling_samples(client, bundled, example):
    path, truth = example
    # the lowest temperature leaves one token in the nucleus: the greedy caption
    assert caption(client, path, "nucleus sampling", top_p=0.9, temperature=0.1) == truth["caption"]
    # a hot one writes different captions for the same image; greedy never does. On a photo:
    # on its own scenes the bundled model is so sure that even temperature 2 can repeat the
    # caption six times, but a photo it never saw leaves it unsure (6 of 6 differed)
    photo = photo_examples()[0]
    hot = {caption(client, photo, "nucleus sampling", top_p=1.0, temperature=2.0) for _ in range(6)}
    assert len(hot) > 1, hot
    assert len({caption(client, photo) for _ in range(3)}) == 1
    assert {caption(client, path) for _ in range(3)} == {truth["caption"]}


def test_max_length_cuts_the_caption_and_is_bounded(client, bundled, example):
    path, truth = example
    ids = bundled.tokenizer(truth["caption"], add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    assert caption(client, path, max_tokens=2) == bundled.tokenizer.decode(ids[:2]).strip()
    # the slider's bounds, from VLM_MAX_NEW_TOKENS, are checked before the model runs
    with pytest.raises(AppError, match="less than minimum value 1"):
        caption(client, path, max_tokens=0)
    with pytest.raises(AppError, match=f"greater than maximum value {MAX_NEW_TOKENS}"):
        caption(client, path, max_tokens=MAX_NEW_TOKENS + 1)
    assert caption(client, path, max_tokens=MAX_NEW_TOKENS) == truth["caption"]


# ---------------------------------------------------------------------------- caption_files


def test_caption_files_lists_bad_images_with_a_warning_and_writes_the_same_csv(client, tmp_path):
    good = shapeworld_examples()[:2]
    for path, _ in good:
        shutil.copy(path, tmp_path / path.name)
    broken = [make_truncated_jpeg(tmp_path), make_text_jpg(tmp_path)]
    files = [tmp_path / good[0][0].name, broken[0], tmp_path / good[1][0].name, broken[1]]
    table, csv_file = client.predict([handle_file(str(f)) for f in files], "greedy", 3, 0.9, 1.0,
                                     30, api_name="/caption_files")  # fmt: skip
    rows = [tuple(row) for row in table["data"]]
    assert rows[:2] == [(p.name, t["caption"]) for p, t in good]  # the good ones, captioned
    assert [name for name, _ in rows[2:]] == ["truncated.jpg", "notes.jpg"]
    assert rows[2][1].startswith("⚠ ") and "damaged or truncated" in rows[2][1]
    assert rows[3][1].startswith("⚠ ") and "not an image" in rows[3][1]
    with open(csv_file, newline="", encoding="utf-8") as handle:
        written = [tuple(row) for row in csv.reader(handle)]
    assert written == [("file", "caption"), *rows]


def test_caption_files_with_only_bad_images_still_gives_a_table(client, tmp_path):
    table, csv_file = client.predict([handle_file(str(make_text_jpg(tmp_path)))], "greedy", 3,
                                     0.9, 1.0, 30, api_name="/caption_files")  # fmt: skip
    assert [row[0] for row in table["data"]] == ["notes.jpg"]
    assert table["data"][0][1].startswith("⚠ ")
    assert Path(csv_file).read_text(encoding="utf-8").splitlines()[0] == "file,caption"


# ---------------------------------------------------------------------------- few-shot


def test_few_shot_continues_in_the_examples_format(client):
    """Captions as the examples ("Caption: …", the k-shot format the bundled LM read), then
    "Caption:" after the query: the model continues with a caption in ShapeWorld's grammar
    (what it says of the query is weak: docs/shapeworld.md, few-shot)."""
    examples = shapeworld_examples()
    followed = 0
    for i in range(0, 9, 3):
        (p1, t1), (p2, t2), (p3, _) = examples[i : i + 3]
        text = client.predict(
            handle_file(str(p1)), f"Caption: {t1['caption']}", handle_file(str(p2)),
            f"Caption: {t2['caption']}", None, "", handle_file(str(p3)), "Caption:", 12,
            api_name="/few_shot",
        )  # fmt: skip
        followed += bool(CAPTION.fullmatch(text))
    assert followed >= 2


# ---------------------------------------------------------------------------- sessions


def test_only_the_latest_sessions_are_kept(server, example):
    """VLM_MAX_SESSIONS=3: after four new sessions, Gradio has forgotten the first one (its
    deep link is empty) and keeps the last; the forgotten visitor is still served."""
    clients = [Client(server, auth=AUTH, verbose=False) for _ in range(4)]
    for c in clients:
        assert c.predict(handle_file(str(example[0])), api_name="/caption")

    def kept(c: Client) -> bool:
        answer = httpx.get(server + "gradio_api/deep_link", cookies=c.cookies,
                           params={"session_hash": c.session_hash})  # fmt: skip
        assert answer.status_code == 200
        return answer.json() != ""

    assert kept(clients[-1]) and not kept(clients[0])
    assert clients[0].predict(handle_file(str(example[0])), api_name="/caption")
