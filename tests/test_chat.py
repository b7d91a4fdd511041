"""Conversations about images (`Pipeline.chat`, the Chat tab, /chat): history read by the
frozen LM, follow-ups that need it, new images that must not be confused with old ones, the
history trimmed to the LM's length, and a two-turn chat in a real browser."""

from __future__ import annotations

import random

import pytest
from conftest import shapeworld_pipeline
from gradio_client import Client
from test_app import launch_chromium, serve

from vlm import shapeworld as sw
from vlm.chat import ChatError, turns
from vlm.examples import shapeworld_examples
from vlm.shapeworld.evaluation import chat_scores, normalize_caption


def user(*blocks) -> dict:
    content = [{"type": "image", "image": b} if not isinstance(b, str) else
               {"type": "text", "text": b} for b in blocks]  # fmt: skip
    return {"role": "user", "content": content}


def one_object_scenes(n: int, seed: str) -> list[sw.Scene]:
    rng = random.Random(seed)
    return [sw.sample_scene(rng, 1) for _ in range(n)]


def test_a_follow_up_without_an_image_is_about_the_image_before():
    pipeline = shapeworld_pipeline()
    right = []
    for scene in one_object_scenes(8, "chat-follow-up"):
        image, thing = sw.render(scene), scene.objects[0]
        first = pipeline.chat([user(image, f"what color is the {thing.shape}?")])
        talk = [user(image, f"what color is the {thing.shape}?"),
                {"role": "assistant", "content": first}, user("what size is it?")]  # fmt: skip
        right.append(normalize_caption(pipeline.chat(talk, max_new_tokens=4)) == thing.size)
    assert sum(right) >= 7, right
    with pytest.raises(ChatError, match="has no image"):  # without the history: nothing to see
        pipeline.chat([user("what size is it?")])


def test_a_new_image_is_answered_as_if_asked_alone():
    pipeline = shapeworld_pipeline()
    a, b = (sw.render(s) for s in one_object_scenes(2, "chat-two-images"))
    first = pipeline.chat([user(a, "what shape is it?")])
    talk = [user(a, "what shape is it?"), {"role": "assistant", "content": first},
            user(b, "what color is it?")]  # fmt: skip
    assert pipeline.chat(talk) == pipeline.answer([b], ["what color is it?"])[0]
    streamed = pipeline.stream_chat(talk).final()
    assert streamed.text == pipeline.chat(talk) and streamed.calibrated


def test_a_long_history_is_trimmed_oldest_first_keeping_its_image():
    from vlm.chat import conversation

    pipeline = shapeworld_pipeline()
    scene = one_object_scenes(1, "chat-long")[0]
    image, thing = sw.render(scene), scene.objects[0]
    talk = [user(image, "how many shapes are there?"), {"role": "assistant", "content": "one"}]
    for _ in range(12):
        talk += [user("how many objects are there?"), {"role": "assistant", "content": "one"}]
    talk.append(user(f"what color is the {thing.shape}?"))
    kept = conversation(pipeline, talk, 6)
    assert kept.dropped > 0
    assert sum(not isinstance(p, str) for p in kept.parts) == 1  # the image moved, not lost
    assert pipeline.chat(talk, max_new_tokens=6) == thing.color


@pytest.mark.parametrize(
    "messages, words",
    [
        ([], "nothing to answer"),
        ([{"role": "system", "content": "x"}], "must be user or assistant"),
        ([{"role": "assistant", "content": "hi"}], "must answer a user's"),
        ([{"role": "user", "content": [{"type": "image", "image": None}]}], "has no text"),
        ([{"role": "user", "content": [{"type": "video"}]}], "not 'video'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
         "must be the user's"),
    ],
)  # fmt: skip
def test_a_conversation_that_is_not_one_gets_a_clear_message(messages, words):
    with pytest.raises(ChatError, match=words):
        turns(messages)


def test_second_turns_are_about_as_right_as_single_questions():
    """(n=80 a slice; at n=250, seed 1234: 0.952 vs 0.960 seen, 0.944 vs 0.944 held-out
    combinations, 0.920 vs 0.920 follow-ups in held-out forms)"""
    scores = chat_scores(shapeworld_pipeline(), 80, 777)
    for slice_ in ("", "held_out_", "phrasing_"):
        single, second = scores[f"{slice_}chat_single_turn"], scores[f"{slice_}chat_second_turn"]
        assert second >= single - 0.06 and second >= 0.8, scores


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("chat"))


def test_chat_through_the_api_and_its_limits(app):
    path, truth = next((p, t) for p, t in shapeworld_examples() if t["n_objects"] == 1)
    client = Client(app, verbose=False)
    image = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
    asked = [{"type": "image", "image": image}, {"type": "text", "text": "what shape is it?"}]
    talk = [{"role": "user", "content": asked}]
    reply, note = client.predict(talk, 20, api_name="/chat")
    assert reply == truth["objects"][0]["shape"] and note == ""
    outside = [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"},
                                            {"type": "text", "text": "what is it?"}]}]  # fmt: skip
    with pytest.raises(Exception, match="outside the folders it may read from"):
        client.predict(outside, 20, api_name="/chat")
    with pytest.raises(Exception, match="At most 40 messages"):
        client.predict([talk[0]] * 41, 20, api_name="/chat")


def test_a_two_turn_chat_in_a_browser(app):
    from playwright.sync_api import sync_playwright

    path, truth = next((p, t) for p, t in shapeworld_examples() if t["n_objects"] == 1)
    thing = truth["objects"][0]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app)
        page.wait_for_selector("#caption-image")
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.locator("#chat-box input[type=file]").set_input_files(str(path))
        page.locator("#chat-box [aria-label='Uploaded files'] img").first.wait_for(timeout=30_000)
        box = page.locator("#chat-box textarea")
        for question, answer in (("what color is it?", thing["color"]),
                                 ("what shape is it?", thing["shape"])):  # fmt: skip
            box.fill(question)
            box.press("Enter")
            page.locator("#chat").get_by_text(answer, exact=True).wait_for(timeout=60_000)
        shaded = page.locator("#chat-words .score-token").all_inner_texts()
        assert [w.strip() for w in shaded if w.strip()] == [thing["shape"]]
        page.locator("#chat-clear").click()
        page.wait_for_function("() => !document.querySelector('#chat').innerText.includes("
                               f"'{thing['shape']}')", timeout=15_000)  # fmt: skip
        browser.close()
