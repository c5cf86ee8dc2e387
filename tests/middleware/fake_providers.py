"""Local HTTP servers that speak the providers' wire formats (JSON and server-sent events), for
the real ``openai`` and ``anthropic`` SDKs, sync and async, to talk to: no network. ``mode``
chooses what a server does next: answer, stream, stream and break off mid-way (``break``), or
fail with a 500 before answering (``fail``); the Responses API also stops at the output bound
(``incomplete``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
         "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 0}}
#: The Responses API's usage: totals that include their cached and reasoning parts.
RESPONSES_USAGE = {"input_tokens": 1100, "input_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 0},
                   "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 1150}
ANTHROPIC_USAGE = {"input_tokens": 900, "output_tokens": 1, "cache_read_input_tokens": 300,
                   "cache_creation_input_tokens": 0}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.fake.requests.append(body)
        if self.fake.mode == "fail":
            self.json(500, {"error": {"message": "the model is overloaded", "type": "server_error"}})
        else:
            self.fake.answer(self, body)

    def json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def open_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

    def event(self, payload: dict[str, Any], name: str | None = None) -> None:
        self.wfile.write((f"event: {name}\n" if name else "").encode() + f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def drop(self) -> None:
        """The connection drops mid-answer (HTTP/1.0, no length: the client sees the body end)."""
        self.wfile.flush()
        self.connection.shutdown(2)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server signature
        pass


class FakeProvider:
    """A server on a free loopback port; ``answer`` is the provider's side of a request."""

    def __init__(self) -> None:
        self.mode = "answer"
        self.requests: list[dict[str, Any]] = []
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer(self, http: _Handler, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeOpenAI(FakeProvider):
    """Chat completions (``/v1/chat/completions``) and the Responses API (``/v1/responses``)."""

    def __init__(self) -> None:
        super().__init__()
        #: The chat usage it reports (by default ``USAGE``); a function of the request body when set.
        self.usage_for: Any = None

    def answer(self, http: _Handler, body: dict[str, Any]) -> None:
        if http.path.endswith("/responses"):
            self._responses(http, body)
        elif body.get("stream"):
            self._chat_stream(http, body)
        else:
            http.json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "Hello there."}}],
                            "usage": self.usage_for(body) if self.usage_for else USAGE})

    def _chat_stream(self, http: _Handler, body: dict[str, Any]) -> None:
        http.open_stream()
        base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        for word in ["Hel", "lo", " there", "."]:
            http.event({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
            if self.mode == "break" and word == "lo":
                return http.drop()
        http.event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            http.event({**base, "choices": [], "usage": USAGE})
        http.wfile.write(b"data: [DONE]\n\n")

    def _responses(self, http: _Handler, body: dict[str, Any]) -> None:
        """A response whole, or its stream: ``response.created``, a text delta a word, and
        ``response.completed`` (or ``response.incomplete``) carrying the response with its usage."""
        words = ["Hel", "lo", " there", "."]
        incomplete = self.mode == "incomplete"
        if incomplete:  # stopped at the output bound: billed for what it wrote, up to that bound
            words = words[:2]
        usage = {**RESPONSES_USAGE, "output_tokens": body["max_output_tokens"],
                 "total_tokens": RESPONSES_USAGE["input_tokens"] + body["max_output_tokens"]} if incomplete else RESPONSES_USAGE
        message = {"type": "message", "id": "msg_1", "status": "incomplete" if incomplete else "completed",
                   "role": "assistant", "content": [{"type": "output_text", "text": "".join(words), "annotations": []}]}
        done = {"id": "resp_1", "object": "response", "created_at": 1, "model": body["model"], "output": [message],
                "status": "incomplete" if incomplete else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "usage": usage}
        if not body.get("stream"):
            return http.json(200, done)
        http.open_stream()
        sequence = iter(range(1_000))
        http.event({"type": "response.created", "sequence_number": next(sequence),
                    "response": {**done, "status": "in_progress", "output": [], "usage": None}}, "response.created")
        for word in words:
            http.event({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                        "content_index": 0, "delta": word, "logprobs": [], "sequence_number": next(sequence)},
                       "response.output_text.delta")
            if self.mode == "break" and word == "lo":
                return http.drop()
        last = "response.incomplete" if incomplete else "response.completed"
        http.event({"type": last, "sequence_number": next(sequence), "response": done}, last)


class FakeAnthropic(FakeProvider):
    """The Anthropic messages wire format: a JSON reply, or named server-sent events whose
    ``message_delta`` usage is cumulative (three deltas here: 10, 25, then 40 output tokens)."""

    def answer(self, http: _Handler, body: dict[str, Any]) -> None:
        if not body.get("stream"):
            return http.json(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                   "content": [{"type": "text", "text": "Hello there."}], "stop_reason": "end_turn",
                                   "stop_sequence": None, "usage": {**ANTHROPIC_USAGE, "output_tokens": 40}})
        http.open_stream()
        message = {"id": "msg_2", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": ANTHROPIC_USAGE}
        http.event({"type": "message_start", "message": message}, "message_start")
        http.event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")
        for i, (word, so_far) in enumerate([("Hello", 10), (" there", 25), (".", 40)]):
            http.event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                       "content_block_delta")
            if self.mode == "break" and i == 1:
                return http.drop()
            http.event({"type": "message_delta", "usage": {"output_tokens": so_far},
                        "delta": {"stop_reason": "end_turn" if so_far == 40 else None, "stop_sequence": None}},
                       "message_delta")
        http.event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        http.event({"type": "message_stop"}, "message_stop")
