"""examples/openai_server.py: a real server on 127.0.0.1 (ephemeral port) in a subprocess, spoken to
with urllib in the OpenAI chat-completions format."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from llava_edge.export.gguf import export_gguf  # noqa: E402

SERVER = Path(__file__).resolve().parents[1] / "examples" / "openai_server.py"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    bundle = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("srv") / "b", quant="Q8_0",
                         mmproj_quant="F16")
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", str(SERVER), str(bundle), "--port", "0", "--threads", "1",
         "--max-body-mb", "0.25", "--max-tokens", "64", "--model-id", "tiny", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/v1"
        if not line:
            pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
        base = line.rsplit(" at ", 1)[1].strip()
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def _post(base: str, body=None, raw: bytes | None = None) -> tuple[int, bytes, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _question(test_image, **params) -> dict:
    return {"model": "tiny", "max_tokens": 6, **params, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": _data_uri(test_image)}}]}]}


def _error(status_body) -> str:
    return json.loads(status_body[1])["error"]["message"]


def test_bound_to_localhost_and_lists_the_model(server):
    assert server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{server}/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"


def test_non_streaming_reply(server, test_image):
    status, body, kind = _post(server, _question(test_image))
    assert status == 200 and kind == "application/json"
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"  # this random model does not stop within 6 tokens
    assert reply["usage"]["completion_tokens"] == 6
    assert reply["usage"]["prompt_tokens"] > 16  # the image's 16 tokens and the text


def test_streaming_reply_equals_the_non_streaming_one(server, test_image):
    question = _question(test_image, stream=True, stream_options={"include_usage": True})
    status, body, kind = _post(server, question)
    assert status == 200 and kind == "text/event-stream"
    events = [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    plain = json.loads(_post(server, _question(test_image))[1])["choices"][0]["message"]["content"]
    assert streamed == plain  # greedy: the same text either way


def test_follow_up_with_the_whole_conversation(server, test_image):
    first = _question(test_image)
    answer = json.loads(_post(server, first)[1])["choices"][0]["message"]["content"]
    history = [*first["messages"], {"role": "assistant", "content": answer},
               {"role": "user", "content": "And the colour?"}]
    follow = {**first, "max_tokens": 2, "messages": history}
    status, body, _ = _post(server, follow)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def test_oversize_request_is_refused_with_413(server):
    status_body = _post(server, raw=b"{" + b" " * (300 * 1024) + b"}")
    assert status_body[0] == 413 and "at most 262144 (--max-body-mb)" in _error(status_body)


def test_bad_image_is_a_400(server):
    question = {"messages": [{"role": "user", "content": [
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}},
        {"type": "text", "text": "hi"}]}]}
    status_body = _post(server, question)
    assert status_body[0] == 400 and "messages[0].content[0]: not a usable image" in _error(status_body)
    question["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@@"
    assert "base64 is malformed" in _error(_post(server, question))


def test_remote_image_urls_are_refused(server):
    question = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    status_body = _post(server, question)
    assert status_body[0] == 400 and "remote image URLs (https:) are not fetched" in _error(status_body)


def test_malformed_requests_are_400s(server, test_image):
    status_body = _post(server, raw=b'{"messages": [')
    assert status_body[0] == 400 and "not valid JSON" in _error(status_body)
    assert "'messages' must be a non-empty list" in _error(_post(server, {"messages": []}))
    too_long = _question(test_image, max_tokens=65)
    assert "max_tokens must be an integer from 1 to 64" in _error(_post(server, too_long))
    assert "system messages are not supported" in _error(_post(server, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}))
    assert "the last message must be from the user" in _error(_post(server, {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    status_body = _post(server, {"messages": [{"role": "assistant", "content": "hello"}]})
    assert status_body[0] == 400 and "expected the user's turn next" in _error(status_body)
