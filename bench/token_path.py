"""The event loop's own work per streamed token, without sockets: text, then chunk bytes.

Feeds a real tokenizer's ids of mixed text (ASCII, Korean, Chinese, emoji) through a choice's
assembler (detokenizer, stop strings, optional reasoning split) and renders each update as the
stream would, once with the server's paths and once with the paths they shortcut (transformers'
`decode` for every window, the chunk built as models and dumped), and prints microseconds per
token for each. At 64 streams this work runs on the event loop while the engine thread waits
for the same interpreter lock (bench/NOTES.md).

    python bench/token_path.py [--tokens 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from model_factory import qwen3_tokenizer_dir
    from transformers import AutoTokenizer

    from mlx_llm_server import protocol as wire
    from mlx_llm_server.choice import ChoiceAssembler, ChoiceOptions, ChoiceUpdate
    from mlx_llm_server.engine.types import TokenEvent
    from mlx_llm_server.service import ContentChunks, _chat_delta
    from mlx_llm_server.text.detokenizer import _info_for

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    text = "The quick brown fox jumps over the lazy dog. 안녕하세요 세계! 你好 世界。 😀🎉 " * 400
    ids = tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    info = _info_for(tokenizer)
    direct = info.direct_decode

    def chunk(update: ChoiceUpdate) -> bytes:
        body = wire.ChatCompletionChunk(
            id="chatcmpl-0",
            created=0,
            model="m",
            choices=[wire.ChunkChoice(index=0, delta=_chat_delta(update))],
        )
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n".encode()

    def run(fast: bool, reasoning: bool, render: bool) -> float:
        info.direct_decode = direct if fast else None
        assembler = ChoiceAssembler(tokenizer, ChoiceOptions(reasoning=reasoning))
        template = ContentChunks(lambda t: chunk(ChoiceUpdate(content=t)))
        started = time.perf_counter()
        for token_id in ids:
            update = assembler.add(TokenEvent(token_id, None, None))
            if not render or not update:
                continue
            if fast and update.content and not update.reasoning:
                template(update.content)
            else:
                chunk(update)
        return (time.perf_counter() - started) / len(ids) * 1e6

    print(f"{len(ids)} tokens, best of {args.repeats}; us per token")
    print("| work | shortcut paths | server's paths |")
    print("|---|---:|---:|")
    for label, reasoning, render in (
        ("text (detokenizer, stops)", False, False),
        ("text + chunk bytes", False, True),
        ("text + reasoning split + chunk bytes", True, True),
    ):
        slow = min(run(False, reasoning, render) for _ in range(args.repeats))
        fast = min(run(True, reasoning, render) for _ in range(args.repeats))
        print(f"| {label} | {slow:.1f} | {fast:.1f} |")
    info.direct_decode = direct


if __name__ == "__main__":
    main()
