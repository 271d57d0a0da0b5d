"""CPU checks for the accelerated 4-bit quantized layers (the CUDA kernel runs in bench/)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_llm_server.kernels.quantized_linear import (
    STAGED_MIN_ROWS,
    AcceleratedQuantizedEmbedding,
    AcceleratedQuantizedLinear,
    FusedConfig,
    accelerate_quantized_layers,
    choose_path,
    cuda_gpu_is_default,
    fused_supported,
    kernel_source,
    launch_shape,
    set_one_row_fused,
    set_staged_min_rows,
)
from mlx_llm_server.kernels.quantized_linear import _default_fused_config as tile_shape
from mlx_llm_server.kernels.quantized_linear import _shared_bytes as shared_bytes


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 256)
        self.layers = [nn.Linear(256, 256, bias=False) for _ in range(2)]
        self.head = nn.Linear(256, 512, bias=True)

    def __call__(self, tokens: mx.array) -> mx.array:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h) + self.embed.as_linear(h)


def _quantized_model(group_size: int = 64) -> _Tiny:
    mx.random.seed(0)
    model = _Tiny()
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=group_size, bits=4)
    mx.eval(model.parameters())
    return model


def _rel_err(a: mx.array, b: mx.array) -> float:
    a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a32 - b32).max() / mx.abs(b32).max()).item()


def _with_default_device(device: mx.Device):
    class _Ctx:
        def __enter__(self) -> None:
            self.old = mx.default_device()
            mx.set_default_device(device)

        def __exit__(self, *exc: object) -> None:
            mx.set_default_device(self.old)

    return _Ctx()


def test_noop_without_cuda_gpu() -> None:
    model = _quantized_model()
    with _with_default_device(mx.cpu):
        assert not cuda_gpu_is_default()
        assert accelerate_quantized_layers(model) == 0
    assert type(model.layers[0]) is nn.QuantizedLinear
    assert type(model.embed) is nn.QuantizedEmbedding


@pytest.mark.parametrize("group_size", [32, 64])
def test_forced_swap_keeps_parameters_and_outputs(group_size: int) -> None:
    model = _quantized_model(group_size)
    tokens = mx.array([[1, 7, 300], [4, 2, 511]])
    expected = model(tokens)
    before = dict(model.parameters()["layers"][1])

    assert accelerate_quantized_layers(model, force=True) == 4  # 3 linears + tied embedding
    assert isinstance(model.layers[0], AcceleratedQuantizedLinear)
    assert isinstance(model.layers[0], nn.QuantizedLinear)
    assert isinstance(model.embed, AcceleratedQuantizedEmbedding)
    after = model.parameters()["layers"][1]
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key] is value
    assert "bias" in model.head

    # On this machine every supported call takes the stock op (no fused CUDA kernel here).
    assert _rel_err(model(tokens), expected) == 0.0
    # Already swapped layers are left alone.
    assert accelerate_quantized_layers(model, force=True) == 0


def _reference(x: mx.array, layer: nn.Module) -> mx.array:
    """x @ W.T in float32 from the layer's own quantized weights."""
    w = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        layer.biases.astype(mx.float32),
        group_size=layer.group_size,
        bits=layer.bits,
    )
    return x.astype(mx.float32) @ w.T


@pytest.mark.parametrize("rows", [1, 5, 64, 130])
def test_dequantize_path_matches_quantized_linear(rows: int) -> None:
    mx.random.seed(1)
    layer = nn.QuantizedLinear(512, 256, bias=True, group_size=64, bits=4)
    mx.eval(layer.parameters())
    fast = AcceleratedQuantizedLinear.from_quantized(layer)
    fast.force_path = "dequant"
    # float32: the same function as QuantizedLinear up to summation order.
    x = mx.random.normal((rows, 512))
    assert _rel_err(fast(x), layer(x)) < 1e-5
    assert fast(x.reshape(1, rows, 512)).shape == (1, rows, 256)

    # bfloat16: within bf16 rounding of the float32 result (the CPU's stock bf16 op is
    # itself only within a few percent, so it is no reference here).
    layer.set_dtype(mx.bfloat16)
    fast = AcceleratedQuantizedLinear.from_quantized(layer)
    fast.force_path = "dequant"
    xb = x.astype(mx.bfloat16)
    assert _rel_err(fast(xb) - layer.bias, _reference(xb, layer)) < 1e-2


def test_tied_embedding_as_linear_matches() -> None:
    model = _quantized_model()
    emb = AcceleratedQuantizedEmbedding.from_quantized(model.embed)
    emb.force_path = "dequant"
    h = mx.random.normal((2, 3, 256)).astype(mx.bfloat16)
    assert _rel_err(emb.as_linear(h), _reference(h, model.embed)) < 1e-2
    emb.force_path = "stock"
    assert _rel_err(emb.as_linear(h), model.embed.as_linear(h)) == 0.0
    tokens = mx.array([[3, 9]])
    assert _rel_err(emb(tokens), model.embed(tokens)) == 0.0


def test_dense_weights_serve_calls_of_many_rows(fused_kernel_rows: list[int]) -> None:
    """As on an NVIDIA GPU: with dense copies kept, calls of at least the given rows multiply
    with them, exactly as dequantize + matmul does; fewer rows keep the 4-bit kernel. The copies
    stay out of the parameters."""
    import mlx_llm_server.kernels.quantized_linear as ql

    model = _quantized_model()
    before = {key: value for key, value in model.parameters()["layers"][0].items()}
    assert accelerate_quantized_layers(model, force=True) == 4
    expected = ql.dense_weight_bytes(model)
    assert expected == (2 * 256 * 256 + 2 * 512 * 256) * 2  # bf16: two linears, head, embedding
    assert ql.kept_dense_bytes(model) == 0
    with pytest.raises(ValueError, match="at least 1"):
        ql.keep_dense_weights(model, 0)
    assert ql.keep_dense_weights(model, 4) == expected == ql.kept_dense_bytes(model)
    layer = model.layers[0]
    assert model.parameters()["layers"][0].keys() == before.keys()  # no new parameter
    wd = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4)
    assert mx.array_equal(layer._dense_weight, wd)
    assert choose_path(4, 256, 256, dense=True) == "dense"
    assert choose_path(3, 256, 256, dense=True) == "fused"
    assert choose_path(4, 256, 256) == "fused"

    x = mx.random.normal((2, 3, 256)).astype(mx.bfloat16)  # 6 rows, batched
    assert mx.array_equal(layer(x), (x.reshape(-1, 256) @ wd.T).reshape(2, 3, 256))
    residual = mx.random.normal((2, 3, 256)).astype(mx.bfloat16)
    assert mx.array_equal(layer.add_to(x, residual), residual + layer(x))
    assert not fused_kernel_rows  # every call of 6 rows took the dense copy
    layer(x[:1, :3])  # 3 rows: the 4-bit kernel
    assert fused_kernel_rows == [3]
    tokens = mx.array([[1, 7, 300, 4]])
    head = model.embed.as_linear(model.embed(tokens))
    emb = mx.dequantize(
        model.embed.weight, model.embed.scales, model.embed.biases, group_size=64, bits=4
    )
    assert mx.array_equal(head, model.embed(tokens) @ emb.T)

    # An untied head (`lm_head`): the embedding only looks rows up, so it keeps no copy.
    untied = _quantized_model()
    untied.lm_head = untied.pop("head")
    accelerate_quantized_layers(untied, force=True)
    assert ql.keep_dense_weights(untied, 4) == (2 * 256 * 256 + 512 * 256) * 2
    assert untied.embed._dense_weight is None and untied.lm_head._dense_weight is not None


def test_path_choice_and_support() -> None:
    # Qwen3-8B: q/o 4096x4096, k/v 1024x4096, gate/up 12288x4096, down 4096x12288, head 151936.
    assert choose_path(1, 4096, 4096) == "stock"
    assert choose_path(1, 12288, 4096) == "stock"  # host cost beats the GPU saving
    assert choose_path(1, 151936, 4096) == "fused"
    try:  # replayed compiled decode blocks: one row takes the fused kernel everywhere
        set_one_row_fused(True)
        assert choose_path(1, 4096, 4096) == choose_path(1, 1024, 4096) == "fused"
    finally:
        set_one_row_fused(False)
    assert choose_path(1, 4096, 4096) == "stock"
    for rows in (2, 4, 16, 32, 64):  # a decode step: every layer, k/v included
        for n, k in ((4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288), (151936, 4096)):
            assert choose_path(rows, n, k) == "fused"
    assert choose_path(65, 4096, 4096) == "stock"
    assert choose_path(4096, 4096, 4096) == "dequant"
    assert choose_path(4096, 1024, 4096) == "stock"
    assert fused_supported(4096, 151936, 64, 4, mx.bfloat16)
    assert fused_supported(12288, 4096, 32, 4, mx.float16)
    assert not fused_supported(1408, 4096, 64, 4, mx.bfloat16)  # K not a multiple of 256
    assert not fused_supported(4096, 4096, 64, 8, mx.bfloat16)
    assert not fused_supported(4096, 4096, 128, 4, mx.bfloat16)
    assert not fused_supported(4096, 4096, 64, 4, mx.float32)
    assert FusedConfig(mt=1, rt=1, kw=8) == FusedConfig(1, 1, 8)


QWEN3_8B_WIDTHS = (1024, 4096, 6144, 12288, 24576, 151936)  # k/v, q/o/down, qkv, ..., head


def test_tile_shapes_by_rows_and_width() -> None:
    # By default the unstaged kernel up to 32 rows, then the staged one where the layer's width
    # gains from it: the head, the fused gate/up, q/k/v; o/down (4096) and k/v (1024) unstaged.
    for m in (1, 2, 8, 16, 32):
        for n in QWEN3_8B_WIDTHS:
            assert tile_shape(m, n).nw == 1
    for m in (33, 48, 49, 64):
        assert tile_shape(m, 151936) == FusedConfig(mt=4, rt=1, kw=1, nw=8)
        assert tile_shape(m, 24576) == FusedConfig(mt=8, rt=2, kw=1, nw=4)
        assert tile_shape(m, 12288) == tile_shape(m, 6144) == FusedConfig(mt=4, rt=2, kw=2, nw=2)
        assert tile_shape(m, 4096) == FusedConfig(mt=4, rt=2, kw=4)  # o/down: unstaged
        assert tile_shape(m, 1024) == FusedConfig(mt=8, rt=1, kw=4)  # the default shape
    assert tile_shape(64, 6160).nw == 1  # not a multiple of the staged block's 64 features
    # Up to 8 rows, by layer shape (measured at one row): o_proj two tiles a warp and 8 warps
    # (128 blocks of 256 threads), down_proj's long K 8 warps, gate/up and the head two tiles.
    assert launch_shape(tile_shape(1, 4096, 4096), 1, 4096) == ((128 * 256, 1, 1), (256, 1, 1))
    for m in (1, 8):
        assert tile_shape(m, 4096, 12288) == FusedConfig(mt=1, rt=1, kw=8)
        assert tile_shape(m, 24576, 4096) == tile_shape(m, 151936, 4096)
        assert tile_shape(m, 24576, 4096) == FusedConfig(mt=1, rt=2, kw=4)
        assert tile_shape(m, 6144, 4096) == tile_shape(m, 1024, 4096)
        assert tile_shape(m, 6144, 4096) == FusedConfig(mt=1, rt=1, kw=4)
    assert tile_shape(9, 4096, 12288) == FusedConfig(mt=2, rt=1, kw=4)
    # 64 rows of the fused gate/up: 192 blocks of 128 features x 64 rows, 4 warps each.
    assert launch_shape(tile_shape(64, 24576), 64, 24576) == ((192 * 128, 1, 1), (128, 1, 1))
    try:
        set_staged_min_rows(65)  # `--staged-matmul-rows 65`: the unstaged kernel everywhere
        for n in QWEN3_8B_WIDTHS:
            assert tile_shape(64, n) == FusedConfig(mt=8, rt=1, kw=4)
        set_staged_min_rows(49)
        assert tile_shape(48, 24576).nw == 1 and tile_shape(49, 24576).nw == 4
    finally:
        set_staged_min_rows(STAGED_MIN_ROWS)
    assert tile_shape(33, 24576).nw == 4


def test_every_chosen_tile_shape_fits_an_sm() -> None:
    """Register and shared-memory budgets of the shapes the server picks, by default and with
    the staged kernel from one row (registers as `bench/kernel_build_check.py` reports them:
    96-198 a thread, up to 243 for rt=2)."""
    chosen = {
        (m, n, k): tile_shape(m, n, k)
        for m in range(1, 65)
        for n in QWEN3_8B_WIDTHS
        for k in (4096, 12288)
    }
    try:
        set_staged_min_rows(1)
        staged = {(m, n, 0): tile_shape(m, n) for m in range(1, 65) for n in QWEN3_8B_WIDTHS}
    finally:
        set_staged_min_rows(STAGED_MIN_ROWS)
    assert any(cfg.nw > 1 for cfg in staged.values())
    for (m, n, _), cfg in [*chosen.items(), *staged.items()]:
        _, (threads, _, _) = launch_shape(cfg, m, n)
        assert n % (16 * cfg.rt * cfg.nw) == 0
        registers = 243 if cfg.rt == 2 else 200
        assert threads * registers <= 65536
        assert shared_bytes(cfg) <= 227 * 1024
        _, body = kernel_source(cfg, 64, mx.bfloat16)
        assert f"constexpr int NW = {cfg.nw};" in body
        assert ("cp.async" in body) == (cfg.nw > 1)


def test_routing_on_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Path choice and the 2-D flattening, with the CUDA checks and the kernel stubbed."""
    import mlx_llm_server.kernels.quantized_linear as ql

    calls: list[tuple[int, ...]] = []

    def fake_fused(x, w, scales, biases, group_size, config=None):  # type: ignore[no-untyped-def]
        calls.append(x.shape)
        return ql.dequantize_matmul(x, w, scales, biases, group_size)

    monkeypatch.setattr(ql, "_cuda_build", lambda: True)
    monkeypatch.setattr(ql, "_on_gpu", lambda: True)
    monkeypatch.setattr(ql, "fused_quantized_matmul", fake_fused)
    # Thresholds scaled to a 256x256 layer.
    monkeypatch.setattr(ql, "_FUSED_MAX_ROWS", 8)
    monkeypatch.setattr(ql, "_FUSED_ONE_ROW_MIN_WEIGHTS", 2**40)
    monkeypatch.setattr(ql, "_DEQUANT_MIN_ROWS", 64)
    monkeypatch.setattr(ql, "_DEQUANT_MIN_WEIGHTS", 1)

    mx.random.seed(2)
    layer = nn.QuantizedLinear(256, 256, bias=False, group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    mx.eval(layer.parameters())
    fast = AcceleratedQuantizedLinear.from_quantized(layer)
    assert fast._fast

    x = mx.random.normal((4, 1, 256)).astype(mx.bfloat16)
    assert fast(x).shape == (4, 1, 256)
    assert calls == [(4, 1, 256)]  # fused, no reshape

    x = mx.random.normal((16, 1, 256)).astype(mx.bfloat16)
    flat = mx.quantized_matmul(
        x.reshape(16, 256), layer.weight, layer.scales, layer.biases, group_size=64, bits=4
    )
    y = fast(x)
    assert y.shape == (16, 1, 256)
    assert _rel_err(y.reshape(16, 256), flat) == 0.0  # stock op on the flattened rows
    assert len(calls) == 1

    x = mx.random.normal((1, 1, 256)).astype(mx.bfloat16)
    assert _rel_err(fast(x), layer(x)) == 0.0  # one row: the stock call itself

    x = mx.random.normal((2, 40, 256)).astype(mx.bfloat16)
    assert _rel_err(fast(x), _reference(x, layer)) < 1e-2  # dequantize + matmul
    assert len(calls) == 1

    # Activations in another dtype than the scales take the stock op.
    x = mx.random.normal((4, 1, 256))
    assert fast(x).shape == (4, 1, 256)
    assert len(calls) == 1


def test_gate_up_interleaving_round_trips() -> None:
    from mlx_llm_server.kernels.quantized_linear import (
        GATE_UP_RUN,
        interleave_gate_up,
        split_gate_up,
    )

    gate = mx.arange(32 * 3).reshape(32, 3)
    up = -gate
    rows = interleave_gate_up(gate, up)
    assert rows.shape == (64, 3)
    # Runs of 8: gate rows 0-7, up rows 0-7, gate rows 8-15, ...
    assert mx.array_equal(rows[:GATE_UP_RUN], gate[:GATE_UP_RUN]).item()
    assert mx.array_equal(rows[GATE_UP_RUN : 2 * GATE_UP_RUN], up[:GATE_UP_RUN]).item()
    # A matmul's output over those rows (features last) splits back into the two halves.
    halves = split_gate_up(mx.broadcast_to(rows.T[:, None], (3, 2, 64)))
    for half, expected in zip(halves, (gate, up), strict=True):
        assert mx.array_equal(half[:, 0], expected.T).item()


def test_epilogues_on_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which calls take the fused kernel's residual and SwiGLU epilogues (the kernel stubbed
    with its MLX reference on the stock matmul), and that every call computes what the separate
    layers do, bit for bit."""
    import mlx_llm_server.kernels.quantized_linear as ql

    calls: list[tuple[str, tuple[int, ...]]] = []

    def fake_fused(x, *args, epilogue="none", residual=None, norm=None):  # type: ignore[no-untyped-def]
        calls.append((epilogue + ("+norm" if norm is not None else ""), x.shape))
        return ql.reference_fused_matmul(x, *args, epilogue=epilogue, residual=residual, norm=norm)

    monkeypatch.setattr(ql, "_cuda_build", lambda: True)
    monkeypatch.setattr(ql, "_on_gpu", lambda: True)
    monkeypatch.setattr(ql, "fused_quantized_matmul", fake_fused)
    mx.random.seed(4)
    gate, up = (nn.QuantizedLinear(256, 256, bias=False, group_size=64, bits=4) for _ in "gu")
    for layer in (gate, up):
        layer.set_dtype(mx.bfloat16)
    mx.eval(gate.parameters(), up.parameters())
    assert ql.fused_epilogues_apply(gate)
    from mlx_llm_server.kernels.fused_projections import concatenate_gate_up

    fused = ql.AcceleratedQuantizedLinear.from_quantized(concatenate_gate_up(gate, up))
    assert fused.gate_up_interleaved
    expected = {}
    for rows in (1, 4, 100):
        x = mx.random.normal((rows, 1, 256)).astype(mx.bfloat16)
        expected[rows] = nn.silu(gate(x)) * up(x)
        assert mx.array_equal(ql.swiglu_linear(fused, x), expected[rows]).item()
    # Up to 64 rows (one too) on the kernel; more rows: the matmul, then the SwiGLU.
    assert [c for c in calls if c[0] == "swiglu"] == [
        ("swiglu", (1, 1, 256)),
        ("swiglu", (4, 1, 256)),
    ]

    calls.clear()
    down = ql.AcceleratedQuantizedLinear.from_quantized(gate)
    h = mx.random.normal((4, 1, 256)).astype(mx.bfloat16)
    x = mx.random.normal((4, 1, 256)).astype(mx.bfloat16)
    assert mx.array_equal(ql.residual_linear(down, x, h), h + gate(x)).item()
    assert calls == [("residual", (4, 1, 256))]
    one = x[:1]
    assert mx.array_equal(ql.residual_linear(down, one, h[:1]), h[:1] + gate(one)).item()
    assert calls == [("residual", (4, 1, 256))]  # one row of a small layer: stock op, then add
    # attention's (B, heads, 1, D) output read as (B, 1, heads x D) rows, as it is.
    heads = x.reshape(4, 2, 1, 128)
    assert mx.array_equal(ql.residual_linear(down, heads, h), h + gate(x)).item()
    assert calls[-1] == ("residual", (4, 2, 1, 128))
    # An RMSNorm before the matmul: applied first by default; folded in, when turned on, up to
    # the rows asked for (at most 8).
    norm = nn.RMSNorm(256)
    norm.set_dtype(mx.bfloat16)
    xs = mx.random.normal((4, 1, 256)).astype(mx.bfloat16)
    assert mx.array_equal(ql.norm_linear(down, xs, norm), gate(norm(xs))).item()
    assert calls[-1] == ("none", (4, 1, 256))
    with pytest.raises(ValueError):
        ql.set_folded_norm_rows(9)
    monkeypatch.setattr(ql, "_folded_norm_rows", 0)  # restored after the test
    ql.set_folded_norm_rows(8)
    for rows, kind in ((4, "none+norm"), (9, "none")):
        xs = mx.random.normal((rows, 1, 256)).astype(mx.bfloat16)
        assert mx.array_equal(ql.norm_linear(down, xs, norm), gate(norm(xs))).item()
        assert calls[-1] == (kind, (rows, 1, 256))
        both = ql.swiglu_linear(fused, xs, norm)
        assert mx.array_equal(both, nn.silu(gate(norm(xs))) * up(norm(xs))).item()
        assert calls[-1] == ("swiglu" + kind[4:], (rows, 1, 256))
    # Off: no epilogue, the same numbers.
    calls.clear()
    ql.set_fused_epilogues(False)
    try:
        assert not ql.fused_epilogues_apply(gate)
        assert mx.array_equal(ql.residual_linear(down, x, h), h + gate(x)).item()
        x4 = mx.random.normal((4, 1, 256)).astype(mx.bfloat16)
        assert mx.array_equal(ql.swiglu_linear(fused, x4), nn.silu(gate(x4)) * up(x4)).item()
        assert calls and all(epilogue == "none" for epilogue, _ in calls)
    finally:
        ql.set_fused_epilogues(True)


def test_epilogues_in_both_kernels() -> None:
    staged = FusedConfig(mt=8, rt=2, kw=1, nw=4)
    _, staged_residual = kernel_source(staged, 64, mx.bfloat16, "residual")
    _, staged_swiglu = kernel_source(staged, 64, mx.bfloat16, "swiglu")
    # The staged store reads its own names: partials in `red`, NT threads, from feature `nb`.
    assert "residual[o]" in staged_residual and "hexp" in staged_swiglu
    assert "qlx_red" not in staged_swiglu and "nb / 2 + p" in staged_swiglu
    with pytest.raises(ValueError):  # the folded norm is the unstaged kernel's
        kernel_source(staged, 64, mx.bfloat16, norm_eps=1e-6)
    unstaged = FusedConfig(mt=1, rt=1, kw=4)
    _, residual = kernel_source(unstaged, 64, mx.bfloat16, "residual")
    _, swiglu = kernel_source(unstaged, 64, mx.bfloat16, "swiglu")
    assert "residual[o]" in residual and "hexp" in swiglu and "hexp" not in residual
    with pytest.raises(ValueError):
        kernel_source(unstaged, 64, mx.bfloat16, "gelu")
    _, normed = kernel_source(unstaged, 64, mx.bfloat16, "swiglu", norm_eps=1e-6)
    assert "constexpr float EPS = 1e-06f;" in normed and "norm_weight" in normed
    assert "norm_weight" not in swiglu
    with pytest.raises(ValueError):  # the norm: blocks of up to 8 rows only
        kernel_source(FusedConfig(mt=2, rt=1, kw=4), 64, mx.bfloat16, norm_eps=1e-6)
