"""CPU speed of the built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF) in each weight form.

For each form `load_gguf` can produce (the Q4_1/Q8_0 weights as stored, or all weights
dequantized to float32, float16 or bfloat16) it measures the load time, the prefill time of a
chat prompt and the greedy decode rate, once with the BLAS bundled in the `mlx[cpu]` wheel and
once with Debian's OpenBLAS preloaded, then prints a table. Each BLAS runs in its own child
process, since LD_PRELOAD only applies at process start.

    apt-get install -y libopenblas0-pthread      # for the OpenBLAS rows
    .venv/bin/python bench/builtin_cpu.py [--prompt-tokens 64] [--decode-tokens 32]

On a machine shared with other work, compare rows of one run only: each row shows the
1-minute load average when it finished (2 CPUs busy elsewhere halve the rates).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FORMS = ("q4_1", "float32", "float16", "bfloat16")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _matmul_gflops(size: int = 1024, repeats: int = 3) -> float:
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _prompt_ids(tokenizer: Any, count: int) -> list[int]:
    """A chat prompt of exactly `count` tokens: a long question, cut to length."""
    question = (
        "Explain, step by step and with examples, how the water cycle works: evaporation from "
        "oceans and lakes, condensation into clouds, precipitation as rain or snow, and the "
        "paths water takes back to the sea through rivers, soil and groundwater. "
    ) * 8
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    if len(ids) < count:
        raise SystemExit(f"--prompt-tokens {count} is longer than the prompt ({len(ids)})")
    return ids[:count]


def _measure_form(
    path: Path, form: str, prompt_tokens: int, decode_tokens: int, repeats: int
) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_llm_server.models.gguf import load_gguf

    dtype = None if form == "q4_1" else getattr(mx, form)
    start = time.perf_counter()
    model, tokenizer, _ = load_gguf(path, dtype=dtype)
    load_s = time.perf_counter() - start
    prompt = mx.array(_prompt_ids(tokenizer, prompt_tokens))[None]

    def prefill() -> tuple[float, list[Any], mx.array]:
        cache = make_prompt_cache(model)
        begin = time.perf_counter()
        logits = model(prompt, cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(token)
        return time.perf_counter() - begin, cache, token

    # Warm-up (first calls build kernels and allocate), on a short prompt: slow forms take
    # seconds per prefill.
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[:, :8], cache=cache))
    mx.eval(model(prompt[:, :1], cache=cache))  # a decode-shaped step
    prefill_s = float("inf")
    decode_rate = 0.0
    for _ in range(repeats):
        seconds, cache, token = prefill()
        prefill_s = min(prefill_s, seconds)
        begin = time.perf_counter()
        for _ in range(decode_tokens):
            logits = model(token[:, None], cache=cache)
            token = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(token)
        decode_rate = max(decode_rate, decode_tokens / (time.perf_counter() - begin))
    return {
        "form": form,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tok_s": decode_rate,
        "load_average": os.getloadavg()[0],
    }


def worker(args: argparse.Namespace) -> None:
    """Runs in the child process: all forms under the BLAS this process was started with."""
    from mlx_llm_server.models.builtin import resolve_builtin

    path = resolve_builtin("smollm2")
    assert path is not None
    from mlx_llm_server.models.gguf import openblas_loaded

    blas = "openblas" if openblas_loaded() else "bundled"
    result: dict[str, Any] = {"blas": blas, "gflops": _matmul_gflops(), "rows": []}
    for form in args.forms:
        row = _measure_form(path, form, args.prompt_tokens, args.decode_tokens, args.repeats)
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(result))


def _run_child(args: argparse.Namespace, preload: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--repeats",
        str(args.repeats),
        "--forms",
        *args.forms,
    ]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (after a warm-up)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--no-openblas", action="store_true", help="skip the OpenBLAS rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    runs = [_run_child(args, None)]
    if not args.no_openblas:
        if Path(OPENBLAS).exists():
            runs.append(_run_child(args, OPENBLAS))
        else:
            print(f"{OPENBLAS} is missing: apt-get install -y libopenblas0-pthread\n")

    import mlx.core as mx

    print(
        f"SmolLM2-135M-Instruct Q4_1 GGUF on {_cpu_name()}, "
        f"{os.cpu_count()} CPUs, mlx {mx.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"prompt {args.prompt_tokens} tokens, decode {args.decode_tokens} tokens, "
        f"best of {args.repeats}"
    )
    header = (
        f"| {'BLAS':<8} | {'weights':<8} | {'load s':>6} | {'prefill s':>9} | "
        f"{'prefill tok/s':>13} | {'decode tok/s':>12} | {'load avg':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for run in runs:
        for row in run["rows"]:
            print(
                f"| {run['blas']:<8} | {row['form']:<8} | {row['load_s']:>6.2f} | "
                f"{row['prefill_s']:>9.2f} | {row['prefill_tok_s']:>13.1f} | "
                f"{row['decode_tok_s']:>12.1f} | {row['load_average']:>8.2f} |"
            )
    for run in runs:
        print(f"{run['blas']}: float32 1024^3 matmul {run['gflops']:.1f} GFLOP/s")
    best = max(
        (row["decode_tok_s"], run["blas"], row["form"]) for run in runs for row in run["rows"]
    )
    print(f"fastest decode: {best[2]} with {best[1]} BLAS ({best[0]:.1f} tok/s)")


if __name__ == "__main__":
    main()
