"""Decode steps handed to the device in groups of blocks, and the cheaper folded RMSNorm.

Run on the GPU machine from the repository root (the Qwen3-8B-shaped 4-bit model is built
there if missing):

    python3 bench/gpu_submit_groups.py [--settings s0,s6,s3,s6+f1] [--rounds 1x136,64x136]
        [--repeats 2] [--output-tokens 256] [--tokenizer-dir DIR] [--skip-check]

1. The folded norm (`--folded-norm-rows`), which now multiplies each activation by the norm's
   weight as it loads and the sums by 1 / rms as it stores: its largest relative error against
   MLX's RMSNorm followed by the same kernel, and against the stock matmul, on the model's
   q/k/v and gate/up (SwiGLU) layers at 1, 3 and 8 rows.
2. The engine as the server starts it, rounds of users (`gpu_prefill_round.run_round`) with the
   settings alternating within one engine: ``sN`` hands the device every N blocks of a compiled
   decode step as they are built (`set_submit_every`; s0: the whole step at its end), ``fR``
   folds the norms in up to R rows (the blocks are traced again; a setting without it folds
   none, whatever the server's default), joined with "+".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def check_fold(model: Any) -> bool:
    import mlx.core as mx

    from mlx_llm_server.kernels.quantized_linear import (
        fused_quantized_matmul,
        reference_fused_matmul,
    )

    block = model.model.layers[0]
    block = getattr(block, "block", block)
    cases = {
        "input norm + qkv_proj": (block.self_attn.qkv_proj, "none", block.input_layernorm),
        "norm + gate_up_proj, SwiGLU": (
            block.mlp.gate_up_proj,
            "swiglu",
            block.post_attention_layernorm,
        ),
    }
    print("\n## 1. Folded RMSNorm (max |a-b| / max |b|)\n", flush=True)
    print("| layer | rows | vs MLX's norm + the kernel | vs MLX's norm + stock matmul | ok |")
    print("|---|---:|---:|---:|---|")
    ok = True
    for name, (layer, epilogue, norm) in cases.items():
        w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
        k = w.shape[1] * 8
        for rows in (1, 3, 8):
            x = (mx.random.normal((rows, 1, k), key=mx.random.key(rows)) * 3).astype(scales.dtype)
            args = (norm.weight, float(norm.eps))
            ours = fused_quantized_matmul(
                x, w, scales, biases, layer.group_size, epilogue=epilogue, norm=args
            )
            same = fused_quantized_matmul(
                norm(x), w, scales, biases, layer.group_size, epilogue=epilogue
            )
            stock = reference_fused_matmul(
                x, w, scales, biases, layer.group_size, epilogue=epilogue, norm=args
            )
            a = ours.astype(mx.float32)
            errors = []
            for ref in (same, stock):
                b = ref.astype(mx.float32)
                errors.append((mx.abs(a - b).max() / mx.abs(b).max()).item())
            good = not mx.isnan(a).any().item() and max(errors) < 2e-2
            ok &= good
            print(
                f"| {name} | {rows} | {errors[0]:.2e} | {errors[1]:.2e} | "
                f"{'ok' if good else 'FAIL'} |",
                flush=True,
            )
    print(f"\nfolded norm: {'all ok' if ok else 'FAILED'}", flush=True)
    return ok


def apply_setting(model: Any, setting: str) -> None:
    """``sN`` and ``fR`` parts of one setting; the blocks are traced again when R changes."""
    from mlx_llm_server.kernels import compiled_decode
    from mlx_llm_server.kernels import quantized_linear as ql
    from mlx_llm_server.kernels.compiled_decode import CompiledDecodeBlock

    submit_every, fold_rows = 0, 0
    for part in setting.split("+"):
        if part.startswith("s"):
            submit_every = int(part[1:])
        elif part.startswith("f"):
            fold_rows = int(part[1:])
        else:
            raise SystemExit(f"unknown setting {part!r}")
    compiled_decode.set_submit_every(submit_every, submit=compiled_decode._submit)
    if fold_rows != ql._folded_norm_rows:
        ql.set_folded_norm_rows(fold_rows)
        layers = model.model.layers
        layers[:] = [
            CompiledDecodeBlock(b.block, b.max_rows, b.uses_head_rope, b.index) for b in layers
        ]


def engine_rounds(args: Any) -> None:
    from gpu_prefill_round import PassLog, run_round, start_engine

    log = PassLog()
    served = start_engine(args.model, args.tokenizer_dir, [])
    model = served.engine.model
    settings = args.settings.split(",")
    rounds = [tuple(int(n) for n in r.split("x")) for r in args.rounds.split(",")]
    # On this thread while the engine's thread waits for requests: none has been sent yet.
    if not args.skip_check and not check_fold(model):
        print("the folded norm failed its check: its settings are left out")
        settings = [s for s in settings if "f" not in s]

    async def everything() -> None:
        seed = 0
        for users, length in rounds:
            for setting in settings:  # each setting's first round warms its shapes up
                apply_setting(model, setting)
                print(f"\nwarm-up, {setting}:", end="")
                await run_round(served.engine, log, users, length, 16, 0.0, seed)
                seed += 1
            for repeat in range(args.repeats):
                for setting in settings:
                    apply_setting(model, setting)
                    print(f"\n{setting} (round {repeat + 1}):", end="")
                    await run_round(
                        served.engine, log, users, length, args.output_tokens, 0.0, seed
                    )
                    seed += 1

    asyncio.run(everything())
    served.engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="s0,s6,s3,s6+f1")
    parser.add_argument("--rounds", default="1x136,64x136", help="users x prompt tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    engine_rounds(args)
    from mlx_llm_server.cli import exit_without_teardown

    sys.stdout.flush()
    exit_without_teardown(0)  # as the server exits: MLX's device state is not torn down
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
