"""Per-row sampling for a whole batch in a few array operations.

Every sequence keeps its own settings (temperature, top-p, top-k, min-p, penalties, logit bias,
seed) inside the shared batch: the settings are stacked into arrays, so no option forces a
sequence out of the batch or into a per-row loop (seeded rows draw their own noise, one small
operation each, so that a seed reproduces whatever else shares the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from .types import SamplingParams

_MASKED = -float("inf")


@dataclass
class SampleOutput:
    """What one step sampled for each row; arrays stay lazy until the engine reads them."""

    tokens: mx.array  # (B,) int32
    logprobs: mx.array  # (B,) log-probability of each sampled token
    top_ids: mx.array | None = None  # (B, k) most likely tokens, unsorted
    top_logprobs: mx.array | None = None  # (B, k)

    def arrays(self) -> list[mx.array]:
        extra = [self.top_ids, self.top_logprobs] if self.top_ids is not None else []
        return [self.tokens, self.logprobs, *extra]

    def select(self, rows: list[int]) -> SampleOutput:
        index = mx.array(rows, dtype=mx.int32)
        return SampleOutput(
            self.tokens[index],
            self.logprobs[index],
            None if self.top_ids is None else self.top_ids[index],
            None if self.top_logprobs is None else self.top_logprobs[index],
        )

    @staticmethod
    def concat(outputs: Sequence[SampleOutput]) -> SampleOutput:
        tokens = mx.concatenate([o.tokens for o in outputs])
        logprobs = mx.concatenate([o.logprobs for o in outputs])
        widths = {o.top_ids.shape[1] for o in outputs if o.top_ids is not None}
        if not widths:
            return SampleOutput(tokens, logprobs)
        # Rows that asked for fewer (or no) top entries are padded; the engine trims per row.
        width = max(widths)
        ids, values = [], []
        for o in outputs:
            rows = o.tokens.shape[0]
            if o.top_ids is None:
                ids.append(mx.zeros((rows, width), dtype=mx.int32))
                values.append(mx.full((rows, width), _MASKED))
            else:
                pad = width - o.top_ids.shape[1]
                ids.append(mx.pad(o.top_ids, [(0, 0), (0, pad)]))
                values.append(mx.pad(o.top_logprobs, [(0, 0), (0, pad)], constant_values=_MASKED))
        return SampleOutput(tokens, logprobs, mx.concatenate(ids), mx.concatenate(values))


class SamplingBatch:
    """The sampling settings and state (penalty counts, seed steps) of the batch's rows."""

    def __init__(self, params: list[SamplingParams], vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed_steps = [0] * len(params)
        self.generated_counts: mx.array | None = None  # (B, V) for presence/frequency
        self.prompt_seen: mx.array | None = None  # (B, V) for repetition
        self._stack()

    def _stack(self) -> None:
        p = self.params
        self.temperature = mx.array([max(r.temperature, 1e-5) for r in p], dtype=mx.float32)
        self.top_p = mx.array([r.top_p for r in p], dtype=mx.float32)
        self.top_k = mx.array([max(r.top_k, 0) for r in p], dtype=mx.int32)
        self.min_p = mx.array([r.min_p for r in p], dtype=mx.float32)
        self.all_greedy = all(r.greedy for r in p)
        self.any_greedy = any(r.greedy for r in p)
        self.any_top_k = any(r.top_k > 0 for r in p)
        self.any_top_p = any(r.top_p < 1.0 for r in p)
        # Rows whose sampling needs the vocabulary sorted (top-k or top-p); greedy rows never.
        self.filtered_rows = [
            i for i, r in enumerate(p) if not r.greedy and (r.top_k > 0 or r.top_p < 1.0)
        ]
        self.any_min_p = any(r.min_p > 0.0 for r in p)
        self.any_penalty = any(r.uses_penalties for r in p)
        self.want_logprobs = any(r.logprobs for r in p)
        self.top_logprobs_width = max((r.top_logprobs for r in p if r.logprobs), default=0)
        self.presence = mx.array([r.presence_penalty for r in p], dtype=mx.float32)[:, None]
        self.frequency = mx.array([r.frequency_penalty for r in p], dtype=mx.float32)[:, None]
        self.repetition = mx.array([r.repetition_penalty for r in p], dtype=mx.float32)[:, None]
        self.bias: mx.array | None = None
        if any(r.logit_bias for r in p):
            bias = mx.zeros((len(p), self.vocab_size), dtype=mx.float32)
            for row, r in enumerate(p):
                if r.logit_bias:
                    ids = mx.array([i for i in r.logit_bias if 0 <= i < self.vocab_size])
                    values = mx.array(
                        [v for i, v in r.logit_bias.items() if 0 <= i < self.vocab_size]
                    )
                    bias[row, ids] = values
            self.bias = bias

    @classmethod
    def for_sequence(
        cls, params: SamplingParams, prompt_tokens: list[int], vocab_size: int
    ) -> SamplingBatch:
        batch = cls([params], vocab_size)
        if params.uses_penalties:
            batch.generated_counts = mx.zeros((1, vocab_size), dtype=mx.float32)
            seen = mx.zeros((1, vocab_size), dtype=mx.bool_)
            ids = mx.array([t for t in prompt_tokens if 0 <= t < vocab_size], dtype=mx.int32)
            if ids.size:
                seen[0, ids] = True
            batch.prompt_seen = seen
        return batch

    def __len__(self) -> int:
        return len(self.params)

    def select(self, rows: list[int]) -> SamplingBatch:
        out = SamplingBatch([self.params[r] for r in rows], self.vocab_size)
        out.seed_steps = [self.seed_steps[r] for r in rows]
        if self.generated_counts is not None and out.any_penalty:
            index = mx.array(rows, dtype=mx.int32)
            out.generated_counts = self.generated_counts[index]
            out.prompt_seen = self.prompt_seen[index] if self.prompt_seen is not None else None
        return out

    @staticmethod
    def concat(batches: Sequence[SamplingBatch]) -> SamplingBatch:
        out = SamplingBatch([p for b in batches for p in b.params], batches[0].vocab_size)
        out.seed_steps = [s for b in batches for s in b.seed_steps]
        if out.any_penalty:
            counts, seen = [], []
            for b in batches:
                shape = (len(b), b.vocab_size)
                has = b.generated_counts is not None
                counts.append(b.generated_counts if has else mx.zeros(shape, dtype=mx.float32))
                has_seen = b.prompt_seen is not None
                seen.append(b.prompt_seen if has_seen else mx.zeros(shape, dtype=mx.bool_))
            out.generated_counts = mx.concatenate(counts)
            out.prompt_seen = mx.concatenate(seen)
        return out

    def sample(self, logits: mx.array) -> SampleOutput:
        """Samples one token per row from `logits` (B, V). Lazy: nothing is evaluated here.

        Only what some row needs is computed: greedy rows need an argmax, sampled rows
        Gumbel noise over their filtered logits, and normalised log-probabilities are built only
        for top-p filtering or when logprobs were asked for.
        """
        rows = len(self.params)
        if self.all_greedy and not (
            self.want_logprobs or self.any_penalty or self.bias is not None
        ):
            tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
            self._advance(tokens)
            return SampleOutput(tokens, mx.zeros((rows,), dtype=mx.float32))
        logits = logits.astype(mx.float32)
        if self.bias is not None:
            logits = logits + self.bias
        if self.any_penalty and self.generated_counts is not None:
            logits = self._apply_penalties(logits)
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        if not self.all_greedy:
            sampled = self._sample_random(logits)
            tokens = (
                mx.where(self.temperature <= 1e-5, tokens, sampled) if self.any_greedy else sampled
            )
        if not self.want_logprobs:
            self._advance(tokens)
            return SampleOutput(tokens, mx.zeros((rows,), dtype=mx.float32))
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        output = SampleOutput(tokens, chosen)
        if self.top_logprobs_width > 0:
            k = self.top_logprobs_width
            top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k].astype(mx.int32)
            output.top_ids = top_ids
            output.top_logprobs = mx.take_along_axis(logprobs, top_ids, axis=-1)
        self._advance(tokens)
        return output

    def _advance(self, tokens: mx.array) -> None:
        if self.generated_counts is not None:
            rows = mx.arange(len(self.params))
            self.generated_counts = self.generated_counts.at[rows, tokens].add(1.0)
        self.seed_steps = [s + 1 for s in self.seed_steps]

    def _apply_penalties(self, logits: mx.array) -> mx.array:
        counts = self.generated_counts
        assert counts is not None
        generated = counts > 0
        seen = generated if self.prompt_seen is None else generated | self.prompt_seen
        # Repetition penalty as in transformers (seen tokens, prompt included); presence and
        # frequency as OpenAI defines them (generated tokens only).
        penalised = mx.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = mx.where(seen, penalised, logits)
        return logits - counts * self.frequency - generated.astype(mx.float32) * self.presence

    def _sample_random(self, logits: mx.array) -> mx.array:
        scaled = logits / self.temperature[:, None]
        if self.filtered_rows:
            scaled = mx.where(scaled < self._head_limit(scaled), _MASKED, scaled)
        if self.any_min_p:
            floor = mx.max(scaled, axis=-1, keepdims=True) + mx.log(self.min_p[:, None])
            scaled = mx.where(scaled < floor, _MASKED, scaled)
        return mx.argmax(scaled + self._gumbel_noise(scaled.shape), axis=-1).astype(mx.int32)

    def _head_limit(self, scaled: mx.array) -> mx.array:
        """(B, 1) logit below which top-k / top-p drop a token (-inf for unfiltered rows).

        Both filters need the vocabulary sorted, the costliest operation here: only the rows
        that ask for them are sorted.
        """
        rows = self.filtered_rows
        every_row = len(rows) == len(self.params)
        index = mx.array(rows, dtype=mx.int32)
        sub = scaled if every_row else scaled[index]
        top_k = self.top_k if every_row else self.top_k[index]
        top_p = self.top_p if every_row else self.top_p[index]
        descending = -mx.sort(-sub, axis=-1)
        kth = mx.take_along_axis(descending, mx.maximum(top_k - 1, 0)[:, None], axis=-1)
        limit = mx.where(top_k[:, None] > 0, kth, _MASKED)
        if self.any_top_p:
            kept_logits = mx.where(descending < limit, _MASKED, descending)
            probs = mx.softmax(kept_logits, axis=-1)
            # Keep the smallest head whose mass reaches top_p (at least one token).
            before = mx.cumsum(probs, axis=-1) - probs
            kept = mx.maximum(mx.sum(before < top_p[:, None], axis=-1), 1)
            cutoff = mx.take_along_axis(descending, (kept - 1)[:, None], axis=-1)
            limit = mx.maximum(limit, mx.where(top_p[:, None] < 1.0, cutoff, _MASKED))
        if every_row:
            return limit
        full = mx.full((len(self.params), 1), _MASKED)
        full[index] = limit
        return full

    def _gumbel_noise(self, shape: tuple[int, ...]) -> mx.array:
        seeded = [(row, p.seed) for row, p in enumerate(self.params) if p.seed is not None]
        if not seeded:
            return mx.random.gumbel(shape=shape)
        rows = []
        shared = mx.random.gumbel(shape=shape) if len(seeded) < len(self.params) else None
        seeds = dict(seeded)
        for row in range(len(self.params)):
            seed = seeds.get(row)
            if seed is None:
                assert shared is not None
                rows.append(shared[row])
            else:
                # A key from (seed, step): the same request draws the same noise at every step,
                # whatever else shares the batch.
                key = mx.random.key((seed * 1_000_003 + self.seed_steps[row]) % (1 << 63))
                rows.append(mx.random.gumbel(shape=(shape[1],), key=key))
        return mx.stack(rows)
