"""Honest outputs in the page, in a real browser (Playwright + Debian's Chromium), on the
bundled model: every tab says when an image is outside what the model knows, and the words'
shading has an unsure band, says what it means, and shows a guess as unsure."""

from __future__ import annotations

import contextlib

import pytest
from test_app import ARTIFACTS, launch_chromium, serve

from vlm.examples import photo_examples, shapeworld_examples

AMBER = "rgb(245, 158, 11)"  # the unsure band (app.CSS)
# tab, the elem id of its image input (None: the tab's first image input), its button's text
TABS = [
    ("Caption", "caption-image", "Caption"),
    ("Zero-shot", None, "Classify"),
    ("Search", None, "Search"),
    ("Ask", None, "Answer"),
    ("Few-shot", None, "Continue"),
    ("Explain", None, "Show where it matches"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("honest"))


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app)
        page.wait_for_selector("#caption-image")
        yield page
        browser.close()


def _panel(page, tab: str):
    page.get_by_role("tab", name=tab, exact=True).click()
    return page.locator("[role=tabpanel]:visible").first


def _run(page, tab: str, elem_id: str | None, button: str, image, unfamiliar: bool) -> str:
    """Put `image` in the tab's image input, press its button, wait until the notice says
    the image is `unfamiliar` or not (at most 30 s), and return the notice."""
    panel = _panel(page, tab)
    scope = panel.locator(f"#{elem_id}") if elem_id else panel
    clear = scope.locator("button[aria-label='Clear']").first
    if clear.count() and clear.is_visible():
        clear.click()
    scope.locator("input[type=file]").first.set_input_files(str(image))
    scope.locator("img").first.wait_for(timeout=30_000)
    if tab == "Ask":
        panel.get_by_label("Question").fill("what color is the star?")
    if tab == "Explain":
        panel.get_by_label("Label or phrase").fill("a red circle")
    notice = panel.locator(".vlm-familiarity").first
    panel.get_by_role("button", name=button, exact=True).click()
    with contextlib.suppress(Exception):  # the caller's assertion says what was shown instead
        page.wait_for_function(
            "([n, want]) => n.innerText.includes('unlike anything') === want",
            arg=[notice.element_handle(), unfamiliar], timeout=30_000,
        )  # fmt: skip
    page.wait_for_timeout(500)  # the tab's own result, which comes beside the notice
    return " ".join(notice.inner_text().split())


def _shades(page, elem_id: str) -> list[str]:
    """The background colour of each word shown in a words output."""
    return page.locator(f"#{elem_id} .score-token").evaluate_all(
        "tokens => tokens.filter(t => t.innerText.trim())"
        "  .map(t => getComputedStyle(t).backgroundColor)"
    )


def test_every_tab_says_a_photo_is_outside_the_world_and_a_scene_is_not(page):
    photo = photo_examples()[0]
    scene = shapeworld_examples()[0][0]
    for tab, elem_id, button in TABS:
        said = _run(page, tab, elem_id, button, photo, unfamiliar=True)
        assert "unlike anything the shapeworld model was trained on" in said.replace("`", ""), (
            tab, said)  # fmt: skip
        if tab == "Caption":  # a guess: every word shown as unsure, whatever the LM says
            page.wait_for_timeout(2000)
            shades = _shades(page, "caption-words")
            assert shades and all(s == AMBER for s in shades), shades
            page.screenshot(path=str(ARTIFACTS / "honest-photo-caption.png"), full_page=True)
        said = _run(page, tab, elem_id, button, scene, unfamiliar=False)
        assert "unlike" not in said, (tab, said)
        if tab == "Caption":  # the bundle is sure of this scene's words, and right
            page.wait_for_timeout(2000)
            shades = _shades(page, "caption-words")
            assert shades and not any(s == AMBER for s in shades), shades


def test_the_legend_says_what_the_shade_means_for_the_model(page):
    _panel(page, "Caption")
    legend = page.locator("#caption-words-legend").inner_text()
    assert "calibrated on held-out images" in legend and "unsure" in legend, legend
    _panel(page, "Few-shot")  # few-shot continuations have no calibration data
    legend = page.locator("#few-shot-words-legend").inner_text()
    assert "not calibrated" in legend, legend


def test_a_word_below_half_is_shown_in_the_unsure_band(page):
    """The band reads the shade Gradio writes (its alpha is the word's probability)."""
    _panel(page, "Caption")
    shades = page.evaluate(
        """() => {
            const box = document.querySelector('#caption-words');
            return [0.0, 0.12, 0.49, 0.5, 0.77, 1.0].map(p => {
                const token = document.createElement('span');
                token.className = 'score-token';
                token.style.backgroundColor = `rgba(239, 68, 60, ${p})`;
                token.textContent = 'word';
                box.appendChild(token);
                const shade = getComputedStyle(token).backgroundColor;
                token.remove();
                return shade;
            });
        }"""
    )
    assert shades[:3] == [AMBER] * 3 and AMBER not in shades[3:], shades


def test_choosing_a_label_set_chooses_its_templates_and_the_chart_stays_readable(page):
    panel = _panel(page, "Zero-shot")
    templates = panel.get_by_label("Prompt templates", exact=False)
    assert templates.input_value().splitlines() == ["a small {}", "a large {}"]
    dropdown = panel.get_by_label("Label set")
    dropdown.click()
    page.get_by_role("option", name="Outside this model's world: ImageNet (1,000 classes)").click()
    page.wait_for_function(
        "(box) => box.value.startsWith('itap of a {}.')", arg=templates.element_handle(),
        timeout=15_000,
    )  # fmt: skip
    assert "a small {}" not in templates.input_value()
    labels = panel.get_by_label("Labels", exact=False).input_value().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench"
    panel.locator("input[type=file]").first.set_input_files(str(photo_examples()[0]))
    panel.locator("img").first.wait_for(timeout=30_000)
    panel.get_by_role("button", name="Classify", exact=True).click()
    panel.get_by_text("The 10 likeliest labels").wait_for(timeout=60_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(ARTIFACTS / "honest-zero-shot-imagenet.png"), full_page=True)


def test_search_says_what_it_ran(page):
    panel = _panel(page, "Search")
    panel.get_by_label("Text query").fill("a large blue star")
    panel.locator("input[type=file]").first.set_input_files(str(shapeworld_examples()[0][0]))
    panel.locator("img").first.wait_for(timeout=30_000)
    panel.get_by_role("button", name="Search", exact=True).click()
    plan = page.locator("#search-plan")
    plan.get_by_text("Searched by the text and the image together").wait_for(timeout=30_000)
    assert "50% text, 50% image" in plan.inner_text()


def test_the_video_tab_says_its_description_is_a_guess(page, tmp_path):
    """A clip dropped on the Video tab: the frames it read, each with its time and caption,
    and the notice that the bundled model was not trained on videos."""
    import random

    from test_video import write_video

    from vlm.shapeworld.clips import render_clip, sample_clip

    clip = sample_clip(random.Random("page"), "train", n_objects=1)
    path = write_video(tmp_path / "clip.mp4", render_clip(clip, 128), int(clip.fps))
    panel = _panel(page, "Video")
    panel.locator("#video-input input[type=file]").first.set_input_files(str(path))
    panel.locator("#video-input video").first.wait_for(state="attached", timeout=30_000)
    panel.get_by_role("button", name="Describe what happens", exact=True).click()
    notice = panel.locator(".vlm-familiarity").first
    page.wait_for_function("n => n.innerText.includes('not trained on videos')",
                           arg=notice.element_handle(), timeout=60_000)  # fmt: skip
    captions = panel.locator(".vlm-result .caption-label, .vlm-result figcaption")
    page.wait_for_function("n => n.querySelectorAll('img').length >= 4",
                           arg=panel.locator(".vlm-result").first.element_handle(),
                           timeout=30_000)  # fmt: skip
    page.screenshot(path=str(ARTIFACTS / "video-tab.png"))
    assert "guess" in notice.inner_text()
    texts = " ".join(captions.all_inner_texts()) or panel.locator(".vlm-result").inner_text()
    assert "0:00" in texts and "0:03" in texts, texts
