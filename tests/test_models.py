"""Several models in one server: listing, routing by `model`, loading on demand, idle unload."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SCRIPT_TEXT
from server_process import ServerProcess, serving


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def two_models(
    request: pytest.FixtureRequest,
    tiny_qwen3_dir: Path,
    script_tokens: list[int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """Two models, the second loaded on demand; each engine on a thread of the server's
    process or in a process of its own (`--engine-process`), which unloading ends."""
    from scripted_model import write_scripted_model

    folder = tmp_path_factory.mktemp("two-models")
    model_file, scripted_dir = write_scripted_model(folder, script_tokens)
    with serving(
        [
            "--model-name",
            f"tiny={tiny_qwen3_dir}",
            "--model-name",
            f"scripted={scripted_dir}",
            "--custom-model",
            str(model_file),
            "--load-on-demand",
            "--idle-unload-minutes",
            "0.03",
            "--max-running",
            "4",
            *(["--engine-process"] if request.param == "engine-process" else []),
        ],
        folder / "server.log",
    ) as server:
        yield server


def test_lists_every_configured_model(two_models: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{two_models.base_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "scripted"]
    health = httpx.get(f"{two_models.base_url}/health").json()
    assert health["status"] == "ok"
    assert health["models"] == ["tiny"]
    assert health["not_loaded"] == ["scripted"]


def test_model_field_routes_and_loads_on_demand(two_models: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{two_models.base_url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    scripted = client.chat.completions.create(model="scripted", messages=messages)
    assert scripted.choices[0].message.content == SCRIPT_TEXT
    assert scripted.model == "scripted"
    tiny = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert tiny.model == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=messages)
    assert "scripted" in httpx.get(f"{two_models.base_url}/health").json()["models"]


def test_idle_on_demand_model_is_unloaded(two_models: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{two_models.base_url}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = httpx.get(f"{two_models.base_url}/health").json()
        if health.get("not_loaded") == ["scripted"]:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"scripted stayed loaded: {health}")
    assert health["models"] == ["tiny"]  # the first model stays
    again = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "y"}]
    )
    assert again.choices[0].message.content == SCRIPT_TEXT
