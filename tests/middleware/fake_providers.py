"""A local HTTP server that speaks the OpenAI chat completions wire format (JSON and server-sent
events), for the real ``openai`` SDK to talk to: no network. ``mode`` chooses what it does next:
answer, stream, stream and break off mid-way, or fail with a 500."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
         "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 0}}


class FakeOpenAI:
    def __init__(self) -> None:
        self.mode = "answer"
        self.requests: list[dict[str, Any]] = []
        #: The usage it reports (by default ``USAGE``); a function of the request body when set.
        self.usage_for: Any = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if fake.mode == "fail":
                    self._json(500, {"error": {"message": "the model is overloaded", "type": "server_error"}})
                elif body.get("stream"):
                    self._stream(body, broken=fake.mode == "break")
                else:
                    self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": "Hello there."}}],
                                     "usage": fake.usage_for(body) if fake.usage_for else USAGE})

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], broken: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
                for word in ["Hel", "lo", " there", "."]:
                    self._event({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
                    if broken and word == "lo":
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the connection drops mid-answer
                        return
                self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({**base, "choices": [], "usage": USAGE})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server signature
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


ANTHROPIC_USAGE = {"input_tokens": 900, "output_tokens": 1, "cache_read_input_tokens": 300,
                   "cache_creation_input_tokens": 0}


class FakeAnthropic(FakeOpenAI):
    """The Anthropic messages wire format: a JSON reply, or named server-sent events whose
    ``message_delta`` usage is cumulative (three deltas here: 10, 25, then 40 output tokens)."""

    def __init__(self) -> None:
        super().__init__()
        fake = self

        class Handler(self.server.RequestHandlerClass):  # type: ignore[name-defined,misc]
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if not body.get("stream"):
                    self._json(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                     "content": [{"type": "text", "text": "Hello there."}], "stop_reason": "end_turn",
                                     "stop_sequence": None, "usage": {**ANTHROPIC_USAGE, "output_tokens": 40}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                message = {"id": "msg_2", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                           "stop_reason": None, "stop_sequence": None, "usage": ANTHROPIC_USAGE}
                self._named("message_start", {"type": "message_start", "message": message})
                self._named("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})
                for i, (word, so_far) in enumerate([("Hello", 10), (" there", 25), (".", 40)]):
                    self._named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": word}})
                    if fake.mode == "break" and i == 1:
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    self._named("message_delta", {"type": "message_delta", "usage": {"output_tokens": so_far},
                                                  "delta": {"stop_reason": "end_turn" if so_far == 40 else None,
                                                            "stop_sequence": None}})
                self._named("content_block_stop", {"type": "content_block_stop", "index": 0})
                self._named("message_stop", {"type": "message_stop"})

            def _named(self, name: str, payload: dict[str, Any]) -> None:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

        self.server.RequestHandlerClass = Handler
