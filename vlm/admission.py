"""What a public server admits, decided before any request is parsed or queued.

- `RequestLimits`, an ASGI middleware: a request body longer than the limit is refused with
  413 before the app reads it (by its `Content-Length`, and byte by byte for a body sent
  without one); an upload is refused while the app's files would pass their disk quota.
- `FairQueue`: each client may have only so many requests waiting or running in the queue,
  and the heavy group only its share of the queue, so one client cannot fill it for everyone.
- `bound_session_inputs`: what Gradio keeps of each session's last inputs is bounded in size.

Nothing here knows a task or a model; `app.py` sets them up from `vlm.limits`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
from collections.abc import Callable

log = logging.getLogger("vlm.admission")


def _megabytes(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MB"


class RequestLimits:
    """ASGI middleware bounding what a request may make the server hold: any body at most
    `max_body` bytes; a body sent to `upload_path` at most what is left of `upload_quota`
    bytes, given `upload_usage()`, the bytes the app's files take now. Refusals are 413 with
    a one-line message, sent before the body is read (a lying or missing `Content-Length`
    is caught as the body arrives: the app is told the client left, and the 413 goes out)."""

    def __init__(
        self,
        app,
        max_body: int,
        upload_quota: int | None = None,
        upload_usage: Callable[[], int] | None = None,
        upload_path: str = "/gradio_api/upload",
    ):
        self.app, self.max_body = app, max_body
        self.upload_quota, self.upload_usage = upload_quota, upload_usage
        self.upload_path = upload_path

    def _limit(self, path: str) -> tuple[int, str]:
        """The most bytes this request's body may hold, and the refusal's message."""
        if path.rstrip("/").endswith(self.upload_path) and self.upload_quota is not None:
            left = max(0, self.upload_quota - (self.upload_usage() if self.upload_usage else 0))
            return left, (
                "The server's space for uploads is full for now (its quota is "
                f"{_megabytes(self.upload_quota)}; files are deleted after their age): "
                "try again in a few minutes."
            )
        return self.max_body, (
            f"The request is too large (the limit is {_megabytes(self.max_body)}; "
            "VLM_MAX_BODY_SIZE): upload large images as files instead of inline."
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit, message = self._limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, message)
        received, refused, started = 0, False, False

        async def bounded_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:  # more than declared, or no declaration
                    refused = True
                    return {"type": "http.disconnect"}
            return event

        async def guarded_send(event):
            nonlocal started
            if refused:  # the app's answer to a body it never got whole: ours goes instead
                return
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await _refuse(send, message)
        if refused and received > RELEASE_AFTER:  # what the app held of it is freed: give the
            await asyncio.to_thread(release_freed_memory)  # pages back, or they stay resident


# A refused body that was read this far (sent without a length) is given back to the system.
RELEASE_AFTER = 8 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_freed_memory() -> bool:
    """Free what only reference cycles still hold, then hand the C allocator's free pages
    back to the system (glibc's `malloc_trim`). A refused body's chunks stay reachable from
    the parsing error's traceback (a cycle, freed by the cyclic collector whenever it next
    runs), and once freed their pages stay in the allocator's heap (glibc raises its mmap
    threshold after the first large free) until trimmed. False where the C library has no
    such call."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def _refuse(send, message: str) -> None:
    body = json.dumps({"detail": message, "error": message}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def client_of(session_hash: str | None, request, trust_proxy: bool = False) -> str:
    """Who a request comes from, for fairness: the first `X-Forwarded-For` address when the
    operator trusts the proxy in front; else the session (a page, a gradio_client), and for a
    call without one, its peer address."""
    headers = getattr(request, "headers", None) or {}
    if trust_proxy and (forwarded := headers.get("x-forwarded-for")):
        return "address " + forwarded.split(",")[0].strip()
    if session_hash:
        return "session " + session_hash
    peer = getattr(request, "client", None)
    return "address " + (getattr(peer, "host", None) or "unknown")


class FairQueue:
    """Bounds a Gradio queue per client: at most `per_client` requests of one client (see
    `client_of`) waiting or running at once, and at most `heavy_share` waiting or running in
    the concurrency group `heavy_group`, so light requests always find room. A request over
    a bound is refused at once with a message saying why; the queue is not touched.

    Gradio offers no hook for this: `install` wraps the queue's `push` (its one way in, for
    the page's /queue/join and the API's /call/ alike) and tags each event with its client."""

    def __init__(
        self, per_client: int, heavy_group: str, heavy_share: int, trust_proxy: bool = False
    ):
        self.per_client, self.heavy_group, self.heavy_share = per_client, heavy_group, heavy_share
        self.trust_proxy = trust_proxy
        self._lock: asyncio.Lock | None = None

    def install(self, queue) -> None:
        push = queue.push

        async def fair_push(body, request, username):
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:  # a client's requests are counted one at a time
                client = client_of(body.session_hash, request, self.trust_proxy)
                refusal = self.refusal(queue, client, body)
                if refusal is not None:  # "error": Gradio answers 400 with the message,
                    # which the page shows ("queue_full" is 503, shown as a generic "busy")
                    log.info("queue: refused a request of %s: %s", client, refusal)
                    return False, refusal, "error"
                accepted, event_id, state = await push(body, request, username)
                event = queue.event_ids_to_events.get(event_id) if accepted else None
                if event is not None:
                    event.vlm_client = client
                return accepted, event_id, state

        queue.push = fair_push

    def refusal(self, queue, client: str, body) -> str | None:
        """Why `client`'s new request must wait its turn outside the queue, or None."""
        events = _events(queue)
        mine = sum(getattr(e, "vlm_client", None) == client for e in events)
        if mine >= self.per_client:
            return (
                f"You already have {mine} requests waiting or running; each visitor may have "
                f"{self.per_client} at once. Wait for one to finish."
            )
        fn = queue.blocks.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is not None and fn.concurrency_id == self.heavy_group:
            heavy = sum(e.concurrency_id == self.heavy_group for e in events)
            if heavy >= self.heavy_share:
                return (
                    f"The server is busy with {heavy} large requests (zero-shot, captioning "
                    "or indexing many files); try again in a minute."
                )
        return None


def _events(queue) -> list:
    """The queue's events that are waiting or running."""
    waiting = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
    running = [e for job in queue.active_jobs if job for e in job]
    return waiting + running


def _larger_than(value, limit: int) -> bool:
    """Whether the strings and bytes inside `value` (nested lists and dicts) add up to more
    than `limit` characters; stops counting once they do."""
    pending, total = [value], 0
    while pending:
        item = pending.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        if total > limit:
            return True
    return False


def bound_session_inputs(session_state_class, limit: int = 64 << 10) -> None:
    """Gradio keeps a copy of every session's last input values in that session's page
    config (for deep links), for as many sessions as `state_session_capacity`: a 60 MB label
    list or data URL sent once stays in memory, per session, until the session is evicted.
    Past `limit` characters a value is not kept (the session's page shows the default).
    Gradio has no option for this: this wraps `SessionState._update_value_in_config` (its one
    way in), for the whole process; calling it again changes nothing."""
    original = session_state_class._update_value_in_config
    if getattr(original, "vlm_bounded", False):
        return

    def bounded(self, key, value):
        return original(self, key, None if _larger_than(value, limit) else value)

    bounded.vlm_bounded = True
    session_state_class._update_value_in_config = bounded
