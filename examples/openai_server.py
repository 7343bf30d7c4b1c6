"""A local OpenAI-compatible chat server for a llava-edge bundle, on the standard library only.

    python examples/openai_server.py BUNDLE [--port 8000] [--runtime auto] [--threads N]

Speaks ``POST /v1/chat/completions`` (streaming with ``"stream": true`` as server-sent events, or
one JSON reply), ``GET /v1/models`` and ``GET /health``. Images come inline in user messages as
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; remote URLs are refused
(the server never fetches anything). Any OpenAI client works::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="llava", messages=[...], stream=True)

It binds to 127.0.0.1 and has no authentication: it is for apps on this machine. Request bodies over
``--max-body-mb`` are refused (413) before they are read; decoded images over ``--max-image-mb`` too.
The server keeps no conversation state: each request carries the whole conversation, and the runtime
still reuses its KV cache for the shared prefix and encodes each distinct image once (both keyed by
content), so a follow-up question costs only its new tokens. Replies are generated one at a time.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import socket
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llava_edge.api import Assistant, load
from llava_edge.errors import UserError
from llava_edge.model.image import load_image

MIB = 1 << 20


class RequestError(Exception):
    """Something wrong with the request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# --------------------------------------------------------------------------------------------------
# request -> conversation
# --------------------------------------------------------------------------------------------------
def decode_image_url(url, max_image_bytes: int, where: str) -> bytes:
    """The bytes of a ``data:`` URI image; remote URLs and anything malformed are a RequestError."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url needs a 'url' string", where)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https", "ftp", "file"):
        raise RequestError(400, f"{where}: remote image URLs ({scheme}:) are not fetched by this server; "
                                "send the image inline as a data URI: data:image/png;base64,<...>", where)
    if scheme != "data":
        raise RequestError(400, f"{where}: unsupported image URL; send a data URI: "
                                "data:image/png;base64,<...>", where)
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(400, f"{where}: the data URI must be base64 "
                                "(data:image/<type>;base64,<data>)", where)
    if len(payload) * 3 // 4 > max_image_bytes:
        raise RequestError(413, f"{where}: the image is over {max_image_bytes // MIB} MiB", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: the data URI's base64 is malformed", where) from None
    try:
        load_image(data)  # a bad image is the client's error, said now, before any generation
    except UserError as exc:
        raise RequestError(400, f"{where}: not a usable image ({exc})", where) from None
    return data


def split_content(content, role: str, where: str, max_image_bytes: int) -> tuple[str, list[bytes]]:
    """OpenAI message content (a string or a list of text / image_url parts) -> (text, images)."""
    if isinstance(content, str):
        return content, []
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise RequestError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise RequestError(400, f"{at}: images go in user messages", at)
            images.append(decode_image_url(part.get("image_url"), max_image_bytes, at))
        else:
            raise RequestError(400, f"{at}: expected {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", at)
    return "\n".join(texts), images


def generation_options(body: dict, max_tokens_limit: int) -> dict:
    """The OpenAI sampling parameters we honour, checked; others are ignored."""
    gen = {}
    n_max = body.get("max_completion_tokens", body.get("max_tokens"))
    if n_max is not None:
        if not isinstance(n_max, int) or isinstance(n_max, bool) or not 1 <= n_max <= max_tokens_limit:
            raise RequestError(400, f"max_tokens must be an integer from 1 to {max_tokens_limit}",
                               "max_tokens")
        gen["max_new_tokens"] = n_max
    else:
        gen["max_new_tokens"] = min(256, max_tokens_limit)
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise RequestError(400, f"{key} must be a number from {low:g} to {high:g}", key)
            gen[key] = float(value)
    for key in ("seed", "top_k"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError(400, f"{key} must be a non-negative integer", key)
            gen[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        gen["stop"] = tuple(stops)
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    if body.get("tools"):
        raise RequestError(400, "tools are not supported by this model", "tools")
    return gen


def build_chat(assistant: Assistant, body: dict, max_image_bytes: int):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    chat = assistant.chat()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in ("system", "developer"):
            raise RequestError(400, f"{where}: {role} messages are not supported: this model's chat "
                                    "template has a fixed system prompt; drop the message", where)
        if role not in ("user", "assistant"):
            raise RequestError(400, f"{where}: role must be user or assistant, got {role!r}", f"{where}.role")
        text, images = split_content(message.get("content"), role, where, max_image_bytes)
        try:
            chat.add(role, text, images)
        except UserError as exc:
            raise RequestError(400, f"{where}: {exc}", where) from None
    if chat.history[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    return chat


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "llava-edge-openai/0.1"
    timeout = 60  # seconds a client may take to send its request (slow clients do not hold a thread)

    # set by serve()
    assistant: Assistant
    model_id: str = "llava-edge"
    max_body_bytes: int = 20 * MIB
    max_image_bytes: int = 10 * MIB
    max_tokens_limit: int = 2048
    quiet: bool = False

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # --- helpers ---------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None) -> None:
        self._send_json(status, _error_body(message, status, param))
        if status in (411, 413):
            self._discard_body()

    def _discard_body(self, budget_s: float = 2.0, most: int = 64 * MIB) -> None:
        """After refusing a body unread: close our side, then read (and drop) what the client is still
        sending for a moment, so that closing does not reset the connection before the client has
        read our answer (a "lingering close"). Bounded in time and bytes."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            end, seen = time.monotonic() + budget_s, 0
            while time.monotonic() < end and seen < most:
                block = self.connection.recv(1 << 16)
                if not block:
                    break
                seen += len(block)
        except OSError:
            pass

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise RequestError(411, "send the request with a Content-Length header (no chunked bodies)")
        try:
            length = int(length)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if length > self.max_body_bytes:
            raise RequestError(413, f"the request is {length} bytes; this server takes at most "
                                    f"{self.max_body_bytes} (--max-body-mb)")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    # --- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "llava-edge"}]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok", "model": self.model_id,
                                  "runtime": self.assistant.runtime_name})
        else:
            self._send_error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_error(404, f"no route POST {self.path}; use /v1/chat/completions")
            return
        try:
            body = self._read_json()
            gen = generation_options(body, self.max_tokens_limit)
            chat = build_chat(self.assistant, body, self.max_image_bytes)
            pieces = chat.respond(**gen)
        except RequestError as exc:
            self._send_error(exc.status, exc.message, exc.param)
            return
        except UserError as exc:
            self._send_error(400, str(exc))
            return
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(chat, pieces, reply_id, created, include_usage)
        else:
            self._complete(chat, pieces, reply_id, created)

    def _complete(self, chat, pieces, reply_id: str, created: int) -> None:
        try:
            text = "".join(pieces)
        except UserError as exc:  # e.g. the conversation outgrew the context
            self._send_error(400, str(exc))
            return
        info = chat.last
        self._send_json(200, {
            "id": reply_id, "object": "chat.completion", "created": created, "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": info.finish_reason}],
            "usage": {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
                      "total_tokens": info.prompt_tokens + info.completion_tokens},
        })

    def _stream(self, chat, pieces, reply_id: str, created: int, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does

        def event(delta: dict | None, finish: str | None = None, **extra) -> None:
            chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                     "model": self.model_id, **extra}
            chunk.setdefault("choices", [{"index": 0, "delta": delta or {}, "finish_reason": finish}])
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            try:
                for piece in pieces:
                    event({"content": piece})
            except UserError as exc:
                self.wfile.write(f"data: {json.dumps(_error_body(str(exc), 400))}\n\n".encode())
            else:
                event({}, chat.last.finish_reason)
                if include_usage:
                    info = chat.last
                    event(None, choices=[], usage={
                        "prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
                        "total_tokens": info.prompt_tokens + info.completion_tokens})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: stop generating
        finally:
            pieces.close()  # frees the runtime for the next request


def make_server(assistant: Assistant, host: str = "127.0.0.1", port: int = 8000, *,
                model_id: str | None = None, max_body_mb: float = 20, max_image_mb: float = 10,
                max_tokens: int = 2048, quiet: bool = False) -> ThreadingHTTPServer:
    """A server (not yet serving) for ``assistant``; ``port=0`` picks a free port."""
    handler = type("BoundHandler", (Handler,), {
        "assistant": assistant, "model_id": model_id or Path(str(assistant.source)).name,
        "max_body_bytes": int(max_body_mb * MIB), "max_image_bytes": int(max_image_mb * MIB),
        "max_tokens_limit": max_tokens, "quiet": quiet,
    })
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle folder (or model folder, on the torch runtime)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--runtime", default="auto", help="auto, llamacpp, onnx or torch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the runtime")
    parser.add_argument("--model-id", default=None, help="the model name clients see (default: folder name)")
    parser.add_argument("--max-body-mb", type=float, default=20, help="largest request body (413 above)")
    parser.add_argument("--max-image-mb", type=float, default=10, help="largest decoded image (413 above)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    parser.add_argument("--quiet", action="store_true", help="no request log")
    args = parser.parse_args(argv)
    try:
        assistant = load(args.bundle, runtime=args.runtime, threads=args.threads)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = make_server(assistant, args.host, args.port, model_id=args.model_id,
                         max_body_mb=args.max_body_mb, max_image_mb=args.max_image_mb,
                         max_tokens=args.max_tokens, quiet=args.quiet)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, reachable from other machines, with no authentication",
              file=sys.stderr)
    print(f"serving {args.bundle} ({assistant.runtime_name} runtime) at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        assistant.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
