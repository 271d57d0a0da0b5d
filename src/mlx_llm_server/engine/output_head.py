"""Logits at chosen positions only, from the same forward pass as a prompt's body.

A prompt's prefill needs the logits of its last token alone. mlx-lm runs the body (the KV cache,
no logits) and then the last token in a second forward pass: on a GPU a second read of every
weight and another round of kernel launches per prefill group, on a CPU about one decode step.
vLLM (its logits indices) and llama.cpp (its per-token output flags) instead gather the chosen
positions' hidden states before the output head, in the one pass. mlx-lm models have no such
argument, so `OutputHead` puts the gather in front of the head for the length of one call: the
`lm_head` module, or for a tied head the input embedding's `as_linear`. Whatever the model does
after its head (soft-capping, scaling) applies to the gathered rows as it would to all.

A model whose head is found elsewhere is probed once at start-up (`OutputHead.find`); where the
gathered logits do not match the full ones, the engine keeps mlx-lm's two passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

logger = logging.getLogger(__name__)

# Probe tokens for `find`: small ids every vocabulary has.
_PROBE = [1, 2, 3, 4, 5]


class _GatheredHead(nn.Module):
    """An untied head that first picks one position of each row."""

    def __init__(self, head: nn.Module, pick: Callable[[mx.array], mx.array]) -> None:
        super().__init__()
        self.head = head
        self._pick = pick

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.head(self._pick(hidden))


class OutputHead:
    """Runs `model` so that its output head sees one position per row (see the module text)."""

    def __init__(self, model: nn.Module, tied: bool) -> None:
        self.model = model
        self.tied = tied
        self._calls = 0  # head calls during the current `logits_at`

    @classmethod
    def find(cls, model: nn.Module) -> OutputHead | None:
        """The model's output head, checked on a short prompt; None where it can't be used."""
        if isinstance(model.get("lm_head"), nn.Module):
            head = cls(model, tied=False)
        else:
            inner = model.get("model")
            embedding = inner.get("embed_tokens") if isinstance(inner, nn.Module) else None
            if not isinstance(embedding, nn.Module) or not hasattr(embedding, "as_linear"):
                return None
            head = cls(model, tied=True)
        try:
            matches = head._matches_full_logits()
        except Exception:  # a model this does not fit: the two-pass prefill still does
            logger.debug("output head probe failed", exc_info=True)
            matches = False
        if not matches:
            logger.info("prompts end with a forward pass of their own (output head not found)")
            return None
        return head

    def logits_at(self, inputs: mx.array, cache: list[Any], positions: list[int]) -> mx.array:
        """The model's logits at `positions[row]` of each row of `inputs`, shape (rows, vocab);
        the cache takes every input token, as a plain call of the model would."""
        index = mx.array(positions)
        rows = mx.arange(len(positions))

        def pick(hidden: mx.array) -> mx.array:
            self._calls += 1
            return hidden[rows, index][:, None, :]

        self._calls = 0
        with self._gathering(pick):
            logits = self.model(inputs, cache=cache)
        if self._calls != 1 or logits.shape[1] != 1:
            raise RuntimeError("the model's output head was not called once on its hidden states")
        return logits[:, 0, :]

    @contextmanager
    def _gathering(self, pick: Callable[[mx.array], mx.array]) -> Iterator[None]:
        if self.tied:
            embedding = self.model["model"]["embed_tokens"]
            as_linear = embedding.as_linear
            # An instance attribute shadows the method for this call only.
            object.__setattr__(embedding, "as_linear", lambda hidden: as_linear(pick(hidden)))
            try:
                yield
            finally:
                object.__delattr__(embedding, "as_linear")
        else:
            head = self.model["lm_head"]
            self.model["lm_head"] = _GatheredHead(head, pick)
            try:
                yield
            finally:
                self.model["lm_head"] = head

    def _matches_full_logits(self) -> bool:
        tokens = mx.array([_PROBE])
        full = self.model(tokens, cache=make_prompt_cache(self.model))[:, -1, :]
        last = len(_PROBE) - 1
        gathered = self.logits_at(tokens, make_prompt_cache(self.model), [last])
        mx.eval(full, gathered)
        if gathered.shape != full.shape:
            return False
        scale = mx.abs(full).max() + 1e-6
        return bool((mx.abs(gathered - full).max() / scale) < 1e-2)
