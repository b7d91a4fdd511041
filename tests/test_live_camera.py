"""The live camera (the Video tab's "Live camera"): in Chromium with a fake camera playing
ShapeWorld frames from a .y4m file, the caption follows the scene as it changes and the page
says how many frames a second are captioned; a frame that finds the model busy is dropped,
not queued."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from PIL import Image
from test_app import ARTIFACTS, serve

from vlm import shapeworld as sw

RED = sw.Scene((sw.Obj("circle", "red", "large", 0.5, 0.5),))
BLUE = sw.Scene((sw.Obj("star", "blue", "small", 0.3, 0.6),))


def write_y4m(path, frames: list[Image.Image], fps: int = 4):
    """Frames as a YUV4MPEG2 file (4:2:0), what Chromium's fake camera plays in a loop."""
    width, height = frames[0].size
    with open(path, "wb") as handle:
        handle.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for image in frames:
            y, u, v = image.convert("YCbCr").split()
            handle.write(b"FRAME\n" + np.asarray(y).tobytes())
            for plane in (u, v):
                handle.write(np.asarray(plane.resize((width // 2, height // 2))).tobytes())
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("live"))


def test_the_live_caption_follows_the_camera(app, tmp_path):
    from playwright.sync_api import sync_playwright

    frames = [sw.render(RED, 256)] * 12 + [sw.render(BLUE, 256)] * 12  # 3 s each, looped
    camera = write_y4m(tmp_path / "camera.y4m", frames)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-video-capture={camera}"],
        )  # fmt: skip
        page = browser.new_context(permissions=["camera"]).new_page()
        page.goto(app)
        page.wait_for_selector("#caption-image")
        page.get_by_role("tab", name="Video", exact=True).click()
        page.get_by_text("Live camera").click()
        live = page.locator("#live-camera")
        live.get_by_text("Click to Access Webcam").click()
        live.get_by_role("button", name="capture photo").click()
        seen, rates = set(), []
        for _ in range(40):  # 20 s at most: the scene changes every 3 s
            page.wait_for_timeout(500)
            seen.add(page.locator("#live-caption textarea").input_value())
            rates.append(page.locator("#live-rate").inner_text())
            if {"a large red circle", "a small blue star"} <= seen:
                break
        page.screenshot(path=str(ARTIFACTS / "live-camera.png"))
        browser.close()
    assert {"a large red circle", "a small blue star"} <= seen, seen
    rate = float(rates[-1].split()[0])
    assert rate > 0 and "frames a second captioned" in rates[-1], rates[-1]


def test_a_frame_that_finds_the_model_busy_is_dropped(tmp_path):
    from vlm import inputs
    from vlm.serve import Models, Service

    service = Service(Models("shapeworld"), tmp_path, inputs.PathGuard([tmp_path]))
    frame = sw.render(RED, 128)
    assert service.live_caption(frame) == ("a large red circle", "")
    holding, release = threading.Event(), threading.Event()

    def busy():  # another request holds the model's turn
        with service.models.use("shapeworld"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=busy)
    thread.start()
    holding.wait(30)
    try:
        assert service.live_caption(frame) is None  # dropped at once, not waiting
    finally:
        release.set()
        thread.join()
    assert service.live_caption(frame)[0] == "a large red circle"
