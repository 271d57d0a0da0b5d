"""Compiles the fused 4-bit kernel variants with nvcc, as MLX would wrap them, and prints each
one's registers, spills and shared memory: no GPU needed, only CUDA's compiler.

    python bench/kernel_build_check.py [--arch sm_90] [--configs 1,1,4,1 4,1,2,4 ...]
        [--epilogues none residual swiglu] [--norm]

Each epilogue is built for every config; `--norm` also builds each unstaged config of one row
tile (mt 1, nw 1) with an RMSNorm folded in, as the module allows.

MLX's `mx.fast.cuda_kernel` puts the header before a `__global__` function whose parameters
are the inputs (with `x_shape` / `x_ndim` / `w_shape` when the body names them) and the
outputs; this script writes the same around the module's header and body, with a stand-in for
MLX's device utilities (`Shape` is an array of int32).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

PRELUDE = r"""
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
struct Shape { int32_t d[8]; __device__ int32_t operator[](int i) const { return d[i]; } };
"""


def wrap(
    name: str, header: str, body: str, dtype: str, residual: bool = False, norm: bool = False
) -> str:
    extra = f"const {dtype}* norm_weight, " if norm else ""
    extra += f"const {dtype}* residual, " if residual else ""
    return PRELUDE + header + f"""
extern "C" __global__ void {name}(
    const {dtype}* x, const __grid_constant__ Shape x_shape, const __grid_constant__ int x_ndim,
    const uint32_t* w, const __grid_constant__ Shape w_shape,
    const {dtype}* scales, const {dtype}* biases, {extra}{dtype}* y) {{
{body}
}}
"""


def main() -> int:
    import mlx.core as mx

    from mlx_llm_server.kernels.quantized_linear import FusedConfig, kernel_source

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument(
        "--configs",
        nargs="*",
        default=["1,1,4,1", "8,1,4,1", "1,1,4,4", "2,1,4,4", "4,1,2,4", "8,1,2,4", "4,1,4,2"],
        help="mt,rt,kw,nw per variant",
    )
    parser.add_argument("--epilogues", nargs="*", default=["none"], help="of EPILOGUES")
    parser.add_argument("--norm", action="store_true", help="also with an RMSNorm folded in")
    args = parser.parse_args()
    failed = 0
    variants = [
        (spec, epilogue, norm)
        for epilogue in args.epilogues
        for spec in args.configs
        for norm in ((False, True) if args.norm else (False,))
        if not norm or spec.split(",")[0] == spec.split(",")[3] == "1"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for spec, epilogue, norm in variants:
            mt, rt, kw, nw = (int(v) for v in spec.split(","))
            cfg = FusedConfig(mt=mt, rt=rt, kw=kw, nw=nw)
            header, body = kernel_source(cfg, 64, mx.bfloat16, epilogue, 1e-6 if norm else None)
            name = f"k_{mt}_{rt}_{kw}_{nw}_{epilogue}{'_norm' if norm else ''}"
            src = Path(tmp) / f"{name}.cu"
            residual = epilogue == "residual"
            src.write_text(wrap(name, header, body, "__nv_bfloat16", residual, norm))
            out = subprocess.run(
                ["nvcc", f"-arch={args.arch}", "-c", "-o", "/dev/null", "-Xptxas", "-v", str(src)],
                capture_output=True,
                text=True,
            )
            lines = [ln for ln in out.stderr.splitlines() if "registers" in ln or "spill" in ln]
            status = "ok" if out.returncode == 0 else "FAILED"
            print(f"{cfg} {epilogue}{' + norm' if norm else ''}: {status}")
            for ln in lines if out.returncode == 0 else out.stderr.splitlines()[:30]:
                print("   ", ln.strip())
            failed += out.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
