"""One matmul for the projections that read the same input: q/k/v, and gate/up.

A decode step calls seven linear layers a block, and on a fast GPU each call costs about as
much host time (building and encoding the graph node) as device time; the narrow ones also
leave most of the device idle (a 1,024-wide k/v projection). Concatenating the weights of
projections that share an input along their output features gives one wider call instead of
three, or two: fewer nodes for the host, more parallel work per kernel for the device.

The result is the same function: a quantized layer quantizes every output feature on its own
(its own scales and biases per group of inputs), so the concatenated layer holds exactly the
separate layers' numbers, and each output feature is still a dot product of the same row.

Models opt in per module: a module with a ``fuse_projections()`` method (Qwen3's attention and
MLP here) replaces its own layers with one from ``concatenate_linears`` and splits the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .quantized_linear import cuda_gpu_is_default, fused_epilogues_apply, interleave_gate_up

__all__ = ["concatenate_gate_up", "concatenate_linears", "fuse_projections"]


def _same_quantization(layers: Sequence[nn.Module]) -> bool:
    first = layers[0]
    settings = (first.group_size, first.bits, first.mode, first.get("biases") is None)
    return all(
        (layer.group_size, layer.bits, layer.mode, layer.get("biases") is None) == settings
        for layer in layers
    )


def concatenate_linears(layers: Sequence[nn.Module], interleave: bool = False) -> nn.Module | None:
    """One layer computing ``concatenate([layer(x) for layer in layers], axis=-1)``.

    Takes bias-free ``nn.Linear`` layers, or ``nn.QuantizedLinear`` layers (or subclasses)
    quantized alike, all with the same input size; returns None for anything else (the caller
    keeps its layers). The new layer's weights are evaluated here, so the old ones can be freed
    one module at a time. ``interleave`` (two layers of one width): their rows alternate instead,
    as ``interleave_gate_up`` lays them out.
    """
    join = (lambda parts: interleave_gate_up(*parts)) if interleave else mx.concatenate
    if interleave and (len(layers) != 2 or layers[0].weight.shape != layers[1].weight.shape):
        return None
    if not layers or any("bias" in layer for layer in layers):
        return None
    widths = {layer.weight.shape[1] for layer in layers}
    if len(widths) != 1:
        return None
    fused: nn.Module
    # Subclasses too (the accelerated layers): the result is a plain layer either way, for
    # `accelerate_quantized_layers` to swap.
    quantized = all(isinstance(layer, nn.QuantizedLinear) for layer in layers)
    if quantized and _same_quantization(layers):
        first = layers[0]
        fused = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(fused)
        fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
        fused.weight = join([layer.weight for layer in layers])
        fused.scales = join([layer.scales for layer in layers])
        biases = [layer.get("biases") for layer in layers]
        fused.biases = None if biases[0] is None else join(biases)
        fused.freeze()
    elif all(type(layer) is nn.Linear for layer in layers):
        fused = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(fused)
        fused.weight = join([layer.weight for layer in layers])
    else:
        return None
    mx.eval(fused.parameters())
    if interleave:
        fused.gate_up_interleaved = True  # read by `swiglu_linear`
    return fused


def concatenate_gate_up(gate: nn.Module, up: nn.Module) -> nn.Module | None:
    """A SwiGLU MLP's gate and up projections as one layer, for ``swiglu_linear``: rows
    interleaved where the fused 4-bit kernel can compute the SwiGLU as it stores, else
    concatenated."""
    return concatenate_linears([gate, up], interleave=fused_epilogues_apply(gate))


def fuse_projections(model: nn.Module, force: bool = False) -> int:
    """Asks every module that offers it to fuse its projections; only on a CUDA GPU unless
    ``force`` (elsewhere the stock graph stays, as it was measured). Returns how many fused.

    The fused layers are plain ones: run `accelerate_quantized_layers` after it.
    """
    if not force and not cuda_gpu_is_default():
        return 0
    fusing = [m for _, m in model.named_modules() if callable(getattr(m, "fuse_projections", 0))]
    fused = sum(bool(module.fuse_projections()) for module in fusing)
    if fused:
        mx.clear_cache()  # the separate layers' buffers: give them back, not keep them for reuse
    return fused
