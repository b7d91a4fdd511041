"""The demo as an MCP server (`python app.py --mcp`): an agent lists the tasks as tools and
calls them, offline, with the `mcp` client on loopback; images pass the same gate."""

from __future__ import annotations

import asyncio
import base64

import pytest
from test_app import serve

from vlm.examples import photo_examples, shapeworld_examples

TOOLS = {"describe_image", "answer_question", "rank_labels", "search_images", "locate_text",
         "chat_about_images"}  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("mcp"), "--mcp")


def data_url(path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def session(url: str, work):
    """Run `work(client session)` against the app's MCP endpoint; its result."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        endpoint = url.rstrip("/") + "/gradio_api/mcp/"
        async with streamable_http_client(endpoint) as (r, w, _), ClientSession(r, w) as client:
            await client.initialize()
            return await work(client)

    return asyncio.run(run())


def texts(result) -> list[str]:
    return [c.text for c in result.content if getattr(c, "text", None) is not None]


def test_the_tools_are_the_tasks_with_their_descriptions(app):
    async def work(client):
        return (await client.list_tools()).tools

    tools = {tool.name: tool for tool in session(app, work)}
    assert set(tools) == TOOLS  # the page's own endpoints stay API endpoints, not tools
    described = tools["describe_image"]
    assert "caption" in described.description and "data: URL" in str(described.inputSchema)
    assert described.inputSchema["required"] == ["image"]


def test_an_agent_gets_each_scenes_description_and_answers(app):
    scenes = [(path, truth) for path, truth in shapeworld_examples() if truth.get("caption")][:5]

    async def work(client):
        captions = [texts(await client.call_tool("describe_image", {"image": data_url(p)}))[0]
                    for p, _ in scenes]  # fmt: skip
        one = next(p for p, t in scenes if " left of " not in t["caption"])
        question = {"image": data_url(one), "question": "how many shapes are there?"}
        answer = await client.call_tool("answer_question", question)
        return captions, texts(answer)[0]

    captions, answer = session(app, work)
    assert captions == [truth["caption"] for _, truth in scenes]  # 5 of 5
    assert answer == "one"


def test_a_photo_is_called_a_guess_and_a_url_is_not_fetched(app):
    photo = photo_examples()[0]

    async def work(client):
        guessed = texts(await client.call_tool("describe_image", {"image": data_url(photo)}))[0]
        refused = await client.call_tool("describe_image", {"image": "http://127.0.0.1:9/x.png"})
        labels = {"image": data_url(photo), "labels": "a cat, a star"}
        ranked = texts(await client.call_tool("rank_labels", labels))
        return guessed, refused, ranked

    guessed, refused, ranked = session(app, work)
    assert "unlike anything the shapeworld model was trained on" in guessed
    assert refused.isError and "does not fetch URLs" in texts(refused)[0]
    assert "a cat" in ranked[0] and "a star" in ranked[0]


def test_an_agent_chats_about_an_image(app):
    import json

    path, truth = next((p, t) for p, t in shapeworld_examples() if t["n_objects"] == 1)
    shown = [
        {"type": "image", "image": data_url(path)},
        {"type": "text", "text": "what color is it?"},
    ]
    talk = [{"role": "user", "content": shown}, {"role": "assistant", "content": "?"},
            {"role": "user", "content": "what shape is it?"}]  # fmt: skip

    async def work(client):
        reply = await client.call_tool("chat_about_images", {"messages": json.dumps(talk)})
        broken = await client.call_tool("chat_about_images", {"messages": "[{"})
        return texts(reply)[0], broken

    reply, broken = session(app, work)
    assert reply == truth["objects"][0]["shape"]
    assert broken.isError and "not JSON" in texts(broken)[0]
