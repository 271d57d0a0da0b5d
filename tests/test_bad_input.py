"""Every row of the table in docs/errors.md, sent over real HTTP to the real server.

The table is the specification: each row names a case, and the status, `type` and `code` the
server answers it with. The requests are built here, one per row (a row without a request, or
a request without a row, fails `test_table_and_requests_match`). After every answer the
server must still be healthy.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import ServerProcess

MODEL = "tiny-qwen3"
TABLE = Path(__file__).parent.parent / "docs" / "errors.md"
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class BadRequest:
    body: bytes
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    raw_head: bytes | None = None  # sent as is over a socket, for what httpx won't send


def chat(**changes: Any) -> BadRequest:
    """A valid chat request with `changes` applied (a value of `...` removes the field)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    }
    body.update(changes)
    return BadRequest(json.dumps({k: v for k, v in body.items() if v is not ...}).encode())


def message(**fields: Any) -> BadRequest:
    return chat(messages=[{"role": "user", "content": "Hi", **fields}])


def content(value: Any) -> BadRequest:
    return chat(messages=[{"role": "user", "content": value}])


def raw(text: bytes, **headers: str) -> BadRequest:
    return BadRequest(text, headers={**JSON, **headers})


def completion(**changes: Any) -> BadRequest:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **changes}
    return BadRequest(
        json.dumps({k: v for k, v in body.items() if v is not ...}).encode(),
        path="/v1/completions",
    )


VALID = b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NESTED_100 = b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi"}], "x": '
NESTED_100 += b"[" * 100 + b"]" * 100 + b"}"
TEN_MB = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "word " * (2 << 20)}]}
).encode()

REQUESTS: dict[str, BadRequest] = {
    # The body
    "malformed-json": raw(b"{not json"),
    "truncated-json": raw(VALID[:-10]),
    "empty-body": raw(b""),
    "invalid-utf8": raw(b'{"model": "tiny-qwen3", "messages": "\xff\xfe"}'),
    "utf8-bom": raw(b"\xef\xbb\xbf" + VALID),
    "utf16-body": raw(VALID.decode().encode("utf-16")),
    "array-body": raw(b"[1, 2]"),
    "string-body": raw(b'"hello"'),
    "null-body": raw(b"null"),
    "nan": raw(VALID[:-1] + b', "temperature": NaN}'),
    "infinity": raw(VALID[:-1] + b', "temperature": Infinity}'),
    "overflow-to-infinity": raw(VALID[:-1] + b', "temperature": 1e999}'),
    "huge-integer-literal": raw(VALID.replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * 5000)),
    "nesting-100000-deep": raw(VALID[:-1] + b', "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "nesting-100-deep": raw(NESTED_100),
    "lone-surrogate-in-content": raw(VALID.replace(b'"Hi"', b'"Hi \\ud800"')),
    "lone-surrogate-in-key": raw(VALID[:-1] + b', "\\udc00": 1}'),
    "text-plain-content-type": raw(VALID, **{"Content-Type": "text/plain"}),
    "form-content-type": raw(VALID, **{"Content-Type": "application/x-www-form-urlencoded"}),
    "no-content-type": BadRequest(VALID, headers={}),
    "10-mb-prompt": raw(TEN_MB),
    "content-length-over-limit": BadRequest(
        b"",
        raw_head=b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n",
    ),
    "wrong-method": BadRequest(b"", method="GET"),
    "unknown-route": BadRequest(VALID, path="/v1/chat/completion"),
    # model
    "missing-model": chat(model=...),
    "model-not-a-string": chat(model=5),
    "unknown-model": chat(model="gpt-4o"),
    "model-path-traversal": chat(model="../../../../etc/passwd"),
    "model-hub-id": chat(model="mlx-community/Qwen3-8B-4bit"),
    "model-absolute-path": chat(model="/etc"),
    "model-card-path-traversal": BadRequest(b"", method="GET", path="/v1/models/..%2F..%2Fetc"),
    # messages
    "missing-messages": chat(messages=...),
    "empty-messages": chat(messages=[]),
    "messages-not-a-list": chat(messages="Hi"),
    "message-not-an-object": chat(messages=["Hi"]),
    "message-without-role": chat(messages=[{"content": "Hi"}]),
    "unknown-role": message(role="wizard"),
    "function-role": message(role="function", name="f"),
    "content-a-number": content(5),
    "content-an-object": content({"text": "Hi"}),
    "image-part-on-text-model": content(
        [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    ),
    "unknown-part-type": content([{"type": "input_audio", "input_audio": {"data": ""}}]),
    "text-part-without-text": content([{"type": "text"}]),
    "text-part-text-not-a-string": content([{"type": "text", "text": ["Hi"]}]),
    "name-not-a-string": message(name=5),
    "tool-call-arguments-not-a-string": chat(
        messages=[
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}
                ],
            },
        ]
    ),
    # sampling and limits
    "max-tokens-negative": chat(max_tokens=-1),
    "max-tokens-zero": chat(max_tokens=0),
    "max-tokens-string": chat(max_tokens="5"),
    "max-tokens-float": chat(max_tokens=5.5),
    "max-tokens-boolean": chat(max_tokens=True),
    "max-tokens-huge": chat(max_tokens=10**30),
    "max-completion-tokens-zero": chat(max_completion_tokens=0),
    "temperature-negative": chat(temperature=-0.1),
    "temperature-too-high": chat(temperature=5),
    "temperature-string": chat(temperature="hot"),
    "top-p-above-one": chat(top_p=1.5),
    "top-k-below-minus-one": chat(top_k=-5),
    "min-p-above-one": chat(min_p=2),
    "presence-penalty-too-high": chat(presence_penalty=3),
    "frequency-penalty-too-low": chat(frequency_penalty=-3),
    "repetition-penalty-zero": chat(repetition_penalty=0),
    "n-zero": chat(n=0),
    "n-huge": chat(n=1000),
    "seed-string": chat(seed="42"),
    "logit-bias-key-not-a-token-id": chat(logit_bias={"hello": 1}),
    "logit-bias-negative-token-id": chat(logit_bias={"-1": 1}),
    "logit-bias-token-id-beyond-vocabulary": chat(logit_bias={"99999999": 1}),
    "logit-bias-value-out-of-range": chat(logit_bias={"1": 1000}),
    "too-many-stop-sequences": chat(stop=[f"s{i}" for i in range(17)]),
    "empty-stop-sequence": chat(stop=[""]),
    "stop-a-number": chat(stop=5),
    "stream-not-a-boolean": chat(stream="yes"),
    "stream-options-without-stream": chat(stream_options={"include_usage": True}),
    "logprobs-not-a-boolean": chat(logprobs="yes"),
    "top-logprobs-too-high": chat(logprobs=True, top_logprobs=21),
    "top-logprobs-without-logprobs": chat(top_logprobs=2),
    # tools, formats, templates
    "tools-not-a-list": chat(tools="get_time"),
    "tool-type-not-function": chat(tools=[{**TOOL, "type": "retrieval"}]),
    "tool-name-with-spaces": chat(tools=[{"type": "function", "function": {"name": "get time"}}]),
    "tool-parameters-not-an-object": chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": 5}}]
    ),
    "tool-choice-unknown-string": chat(tools=[TOOL], tool_choice="sometimes"),
    "tool-choice-names-a-missing-tool": chat(
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}
    ),
    "tool-choice-without-tools": chat(tool_choice="required"),
    "response-format-unknown-type": chat(response_format={"type": "xml"}),
    "json-schema-not-an-object": chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}
    ),
    "json-schema-invalid": chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
        }
    ),
    "chat-template-kwargs-not-an-object": chat(chat_template_kwargs=["enable_thinking"]),
    "chat-template-kwargs-reserved-name": chat(chat_template_kwargs={"tokenize": True}),
    "prompt-over-context": content("word " * 2000),
    "one-mb-prompt": content("word " * 200_000),
    # /v1/completions
    "completion-missing-prompt": completion(prompt=...),
    "completion-empty-token-list": completion(prompt=[]),
    "completion-token-id-beyond-vocabulary": completion(prompt=[1, 99999999]),
}


def parse_table() -> dict[str, tuple[int, str, str | None]]:
    """`case -> (status, type, code)` from the table's rows (`—` is null)."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            continue
        status, error_type, code = cells[2], cells[3].strip("`"), cells[4].strip("`")
        rows[cells[0].strip("`")] = (int(status), error_type, None if code == "—" else code)
    return rows


ROWS = parse_table()


def test_table_and_requests_match() -> None:
    assert len(ROWS) >= 40
    assert sorted(ROWS) == sorted(REQUESTS)


def send_raw(server: ServerProcess, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", header, re.IGNORECASE).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(header.split(b" ")[1]), rest


@pytest.mark.parametrize("case", sorted(ROWS))
def test_bad_input_gets_its_documented_error(tiny_server: ServerProcess, case: str) -> None:
    status, error_type, code = ROWS[case]
    request = REQUESTS[case]
    if request.raw_head is not None:
        got_status, payload = send_raw(tiny_server, request.raw_head)
        body = json.loads(payload)
    else:
        response = httpx.request(
            request.method,
            f"{tiny_server.base_url}{request.path}",
            content=request.body,
            headers=request.headers,
            timeout=60,
        )
        got_status, body = response.status_code, response.json()
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"]) == (error_type, code), error
    assert httpx.get(f"{tiny_server.base_url}/health").status_code == 200
