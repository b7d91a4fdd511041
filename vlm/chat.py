"""A conversation about images as the frozen LM reads it.

Messages come as OpenAI-style content blocks: `{"role": "user", "content": [{"type":
"image", "image": <PIL image, path or array>}, {"type": "text", "text": "what is it?"}]}`,
assistant turns as text (a plain string is a text block). Each user turn becomes its images'
visual prefixes, in their place, then its text as a question ("Question: … Answer:", the
model's template, as Frozen and BLIP-2 ask); each assistant turn, the answer after it and a
new line. So the LM reads a dialogue as the documents it learned from: a scene, then
question-answer lines about it. A follow-up with no image of its own gets the last image
shown again, right before it, and a mapper that reads the prompt reads the question the LM is
about to answer for every image (read for its own turn's question, the bundle's second
answers fell from 96% to 80%; docs/chat.md).

The whole must fit the LM's positions with room for the reply: the oldest turns are left out
first (`Conversation.dropped` says how many).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .errors import InputError
from .prompts import question_prompt

ROLES = ("user", "assistant")


class ChatError(InputError):
    """Messages that are not a conversation the model can continue; the message says why."""


@dataclasses.dataclass
class Turn:
    """A user's images and text, and the assistant's reply to them (None: to be written)."""

    images: list
    text: str
    reply: str | None = None


@dataclasses.dataclass
class Conversation:
    """What the LM reads (`parts`: prefixes and text) and how many old turns were left out."""

    parts: list
    dropped: int


def turns(messages: Sequence[dict]) -> list[Turn]:
    """The messages as turns; the last one is the user's, without a reply."""
    result: list[Turn] = []
    for number, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ChatError(f"message {number}: its role must be user or assistant, not {role!r}")
        images, texts = [], []
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks or []:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(str(block.get("text") or "").strip())
            elif kind == "image" and role == "user":
                images.append(block.get("image"))
            else:
                allowed = "text or image" if role == "user" else "text"
                raise ChatError(f"message {number}: a {role}'s blocks are {allowed}, not {kind!r}")
        text = " ".join(t for t in texts if t)
        if role == "user":
            if result and result[-1].reply is None:  # two user messages in a row: one turn
                result[-1].images += images
                result[-1].text = " ".join(t for t in (result[-1].text, text) if t)
            else:
                result.append(Turn(images, text))
        elif not result or result[-1].reply is not None:
            raise ChatError(f"message {number}: an assistant's message must answer a user's")
        else:
            result[-1].reply = text
    if not result or result[-1].reply is not None:
        raise ChatError("the last message must be the user's: there is nothing to answer")
    if not result[-1].text:
        raise ChatError("the last message has no text: ask something about the image")
    if not any(t.images for t in result):
        raise ChatError("the conversation has no image: add one to a message")
    return result


def conversation(pipeline, messages: Sequence[dict], max_new_tokens: int) -> Conversation:
    """What `pipeline`'s LM reads for `messages`, its oldest turns left out as far as needed
    for the rest and `max_new_tokens` more to fit its positions."""
    dialogue = turns(messages)
    template = pipeline.config.question_template
    for dropped in range(len(dialogue)):
        kept = [dataclasses.replace(t, images=list(t.images)) for t in dialogue[dropped:]]
        if not kept[-1].images:  # a follow-up: the last image shown again, right before it
            kept[-1].images = [next(i for t in reversed(dialogue) for i in t.images)]
        parts = []
        asked = question_prompt(kept[-1].text, template)  # what the LM is about to answer
        for turn in kept:
            prompt = question_prompt(turn.text, template)
            if turn.images:
                prefixes = pipeline.prefix(turn.images, [asked] * len(turn.images))
                parts += list(prefixes)
            parts.append(prompt)
            if turn.reply is not None:
                parts.append(f" {turn.reply}\n")
        length = len(pipeline.embed(parts))
        if length + max_new_tokens <= pipeline.max_positions:
            return Conversation(parts, dropped)
    raise ChatError(
        f"the last message is too long for this model with its images and {max_new_tokens} "
        f"tokens of reply: it reads at most {pipeline.max_positions} tokens"
    )
