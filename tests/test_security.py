"""Secure defaults over real HTTP: API keys, the Host allow-list, CORS and the body limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess, serving

from mlx_llm_server.security import API_KEY_ENV, SecurityConfig, load_api_keys, normalize_host

MODEL = "tiny-qwen3"
KEYS = {"flag": "key-from-flag", "file": "key-from-file", "env": "key-from-env"}
ORIGIN = "https://app.example"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def secured(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Every security option set: three keys from three sources, CORS, a host, a 1 MB limit."""
    folder = tmp_path_factory.mktemp("secured")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# one key per line\n\n{KEYS['file']}\n")
    with serving(
        [
            "--model-name",
            str(tiny_qwen3_dir),
            "--served-model-name",
            MODEL,
            "--max-running",
            "4",
            "--api-key",
            KEYS["flag"],
            "--api-key-file",
            str(key_file),
            "--cors-origins",
            f"{ORIGIN},https://other.example",
            "--allowed-host",
            "models.example.test",
            "--max-body-mb",
            "1",
            "--log-level",
            "warning",
        ],
        folder / "server.log",
        env={API_KEY_ENV: KEYS["env"]},
    ) as server:
        yield server


def auth(key: str = KEYS["flag"]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["message"]


# API keys --------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", f"/v1/models/{MODEL}"),
    ("GET", "/metrics"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_but_health_needs_a_key(secured: ServerProcess, method: str, path: str) -> None:
    url = f"{secured.base_url}{path}"
    body = {"model": MODEL, "messages": MESSAGES, "prompt": "x", "max_tokens": 1}
    for headers in ({}, auth("wrong"), {"Authorization": f"Basic {KEYS['flag']}"}):
        response = httpx.request(method, url, json=body, headers=headers)
        assert_openai_error(response, 401, "authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.request(method, url, json=body, headers=auth()).status_code != 401


def test_health_needs_no_key(secured: ServerProcess) -> None:
    assert httpx.get(f"{secured.base_url}/health").status_code == 200


@pytest.mark.parametrize("source", sorted(KEYS))
def test_keys_from_flag_file_and_environment_all_work(secured: ServerProcess, source: str) -> None:
    client = openai.OpenAI(base_url=f"{secured.base_url}/v1", api_key=KEYS[source], max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert completion.choices[0].message.content is not None


def test_the_sdk_sees_a_wrong_key_as_authentication_error(secured: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{secured.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)


def test_key_comparison() -> None:
    config = SecurityConfig(api_keys=("alpha", "beta"))
    assert config.key_accepted(b"Bearer beta")
    assert config.key_accepted(b"bearer alpha")
    assert not config.key_accepted(b"Bearer alph")
    assert not config.key_accepted(b"Bearer alphaa")
    assert not config.key_accepted(b"alpha")
    assert not config.key_accepted(b"Bearer ")
    assert not config.key_accepted(None)
    assert not SecurityConfig().key_accepted(b"Bearer anything")


def test_key_sources(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("one\n# comment\n\n two \n")
    assert load_api_keys(["zero"], str(file), {API_KEY_ENV: "three"}) == (
        "zero",
        "one",
        "two",
        "three",
    )
    assert load_api_keys([], None, {}) == ()
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys([], str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="printable ASCII"):
        load_api_keys(["has space"], None, {})


def test_unreadable_key_file_stops_start_up_with_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys.txt"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_llm_server", "--api-key-file", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# Host allow-list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:9044", "127.0.0.1:1", "[::1]:8080", "[::1]", "models.example.test"],
)
def test_loopback_and_configured_hosts_are_served(secured: ServerProcess, host: str) -> None:
    response = httpx.get(f"{secured.base_url}/v1/models", headers={"Host": host, **auth()})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:9044", "localhost.evil.example", "127.0.0.1.nip.io", "::1"],
)
def test_other_hosts_are_refused_against_dns_rebinding(secured: ServerProcess, host: str) -> None:
    for path in ("/v1/models", "/health"):
        response = httpx.get(f"{secured.base_url}{path}", headers={"Host": host, **auth()})
        assert_openai_error(response, 403, "permission_error")


def test_host_names_are_normalized() -> None:
    assert normalize_host("LocalHost:80") == "localhost"
    assert normalize_host("localhost.") == "localhost"
    assert normalize_host("[::1]:9044") == "::1"
    assert normalize_host("::1") is None  # IPv6 needs brackets in a Host header
    assert normalize_host("host:port") is None
    assert normalize_host("") is None
    config = SecurityConfig.for_bind_address("10.1.2.3", allowed_hosts=["Models.Example"])
    assert config.host_allowed(b"10.1.2.3:9044")
    assert config.host_allowed(b"models.example")
    assert not config.host_allowed(b"evil.example")
    assert SecurityConfig.for_bind_address("127.0.0.1", allowed_hosts=["*"]).host_allowed(b"x")
    ipv6 = SecurityConfig.for_bind_address("::", allowed_hosts=["fd00::5"])
    assert ipv6.host_allowed(b"[fd00::5]:9044")
    assert ipv6.host_allowed(b"[::]:9044")
    assert not ipv6.host_allowed(b"[fd00::6]")


# CORS ------------------------------------------------------------------------------------


def test_cors_preflight_for_a_configured_origin(secured: ServerProcess) -> None:
    response = httpx.options(
        f"{secured.base_url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200  # no key: preflights carry none
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_cors_headers_only_for_configured_origins(secured: ServerProcess) -> None:
    url = f"{secured.base_url}/v1/models"
    allowed = httpx.get(url, headers={"Origin": ORIGIN, **auth()})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    # An error is readable by the page too, so it can tell the user what went wrong.
    refused = httpx.get(url, headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    foreign = httpx.get(url, headers={"Origin": "https://evil.example", **auth()})
    assert "access-control-allow-origin" not in foreign.headers


def test_cors_is_off_by_default(tiny_server: ServerProcess) -> None:
    url = f"{tiny_server.base_url}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    response = httpx.post(url, json=body, headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)
    preflight = httpx.options(
        url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert not any(h.startswith("access-control-") for h in preflight.headers)


def test_defaults_need_no_key_and_refuse_foreign_hosts(tiny_server: ServerProcess) -> None:
    assert httpx.get(f"{tiny_server.base_url}/v1/models").status_code == 200
    response = httpx.get(f"{tiny_server.base_url}/v1/models", headers={"Host": "evil.example"})
    assert_openai_error(response, 403, "permission_error")


# Body size -------------------------------------------------------------------------------


def big_body(megabytes: float) -> bytes:
    content = "x" * int(megabytes * (1 << 20))
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()


def test_declared_oversized_body_is_refused_up_front(secured: ServerProcess) -> None:
    response = httpx.post(
        f"{secured.base_url}/v1/chat/completions",
        content=big_body(3),
        headers={"Content-Type": "application/json", **auth()},
    )
    assert_openai_error(response, 413, "invalid_request_error")
    assert response.json()["error"]["code"] == "request_too_large"


def test_streamed_oversized_body_is_refused_while_it_arrives(secured: ServerProcess) -> None:
    body = big_body(3)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(body), 1 << 16):
            yield body[start : start + (1 << 16)]

    with httpx.Client() as client:
        response = client.post(
            f"{secured.base_url}/v1/chat/completions",
            content=chunks(),
            headers={"Content-Type": "application/json", **auth()},
        )
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_openai_error(response, 413, "invalid_request_error")
        # The same connection goes on serving.
        assert client.get(f"{secured.base_url}/v1/models", headers=auth()).status_code == 200


def test_a_lying_content_length_is_refused_without_waiting(secured: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEYS['flag']}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{}"
        )
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 413 ")


def test_a_body_under_the_limit_is_read(secured: ServerProcess) -> None:
    response = httpx.post(
        f"{secured.base_url}/v1/chat/completions",
        content=big_body(0.5),
        headers={"Content-Type": "application/json", **auth()},
    )
    # Read and tokenized: too long for the model's context, which is a different error.
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{secured.base_url}/health").status_code == 200
