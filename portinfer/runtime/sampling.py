"""Next-token selection: greedy, or sampled with temperature, top_k, top_p, min_p and a
repetition penalty, from a seeded generator (the same seed gives the same tokens).

The filters follow Hugging Face's semantics: repetition penalty divides positive logits of
seen tokens and multiplies negative ones; top_k keeps the k largest; top_p keeps the smallest
set whose probability reaches p; min_p drops tokens below min_p * the top probability.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")

        number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"top_k: expected an integer >= 0 (0 or None = off), got {self.top_k!r}")
        if self.top_p is not None:
            number("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if self.min_p is not None:
            number("min_p", self.min_p)
            if not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p: expected a value in [0, 1], got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: expected > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top_p(z, probs, top_p):
    """z with every token dropped (-inf) whose more probable tokens already reach top_p (the most
    probable is always kept). Only the head of the distribution is sorted: the k most probable
    tokens (an O(V) partition), k growing until they hold top_p; a full sort of a vocabulary took
    ~5 ms a row."""
    V = z.shape[-1]
    k = min(64, V)
    while True:
        top = np.argpartition(-probs, k - 1)[:k] if k < V else np.arange(V)
        top = top[np.argsort(-probs[top], kind="stable")]
        before = np.cumsum(probs[top]) - probs[top]  # the probability of the tokens ahead of each
        if k == V or before[-1] + probs[top[-1]] >= top_p:
            break
        k = min(4 * k, V)
    keep = top[:max(1, int(np.searchsorted(before, top_p, side="left")))]
    out = np.full_like(z, -np.inf)
    out[keep] = z[keep]
    return out


class Sampler:
    """Runs on the host in numpy, one thread: torch's ops over a [B, V] vocabulary would run on its
    OpenMP threads, which keep spinning into the next native step and hold up its threads on a small
    machine (a batch-8 SmolLM2 step 9-10 ms after numpy's argmax, 18 ms after torch's: docs/step-plans.md)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        # no seed: fresh entropy; any integer seeds it (numpy's generator takes non-negative ones)
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % (1 << 64))

    def __call__(self, logits, seen: list) -> list[int]:
        """logits fp32 [B, V] (a tensor on any device, or a numpy array), seen: per sequence the token
        ids so far (needed only for the repetition penalty) -> next ids."""
        p = self.params
        x = logits if isinstance(logits, np.ndarray) else logits.detach().float().cpu().numpy()
        if p.greedy and p.repetition_penalty == 1.0:  # numpy's argmax (SIMD, one thread), no copy
            return x.argmax(axis=-1).tolist()
        if p.repetition_penalty != 1.0:
            x = x.copy()
            for b, ids in enumerate(seen or ()):
                if ids:
                    idx = np.array(sorted(set(ids)), dtype=np.int64)
                    vals = x[b, idx]
                    x[b, idx] = np.where(vals > 0, vals / np.float32(p.repetition_penalty),
                                         vals * np.float32(p.repetition_penalty))
        if p.greedy:  # the first maximum, as torch's argmax
            return x.argmax(axis=-1).tolist()
        # float64, and an overflow to +inf clamped: finite fp32 logits near 3e38 over a small temperature
        # must not become inf - inf = NaN probabilities (NaN -> 0, -inf -> the lowest finite value, as
        # torch.nan_to_num)
        big = np.finfo(np.float64).max
        z = np.nan_to_num(x.astype(np.float64) / p.temperature, nan=0.0, posinf=big, neginf=-big)
        V = z.shape[-1]
        if p.top_k:
            k = min(p.top_k, V)
            kth = np.partition(z, V - k, axis=-1)[:, V - k:V - k + 1]  # the k-th largest of each row
            z = np.where(z < kth, -np.inf, z)
        if p.top_p is not None and p.top_p < 1.0:
            z = np.stack([_top_p(row, pr, p.top_p) for row, pr in zip(z, _softmax(z))])
        if p.min_p:
            probs = _softmax(z)
            z = np.where(probs < p.min_p * probs.max(axis=-1, keepdims=True), -np.inf, z)
        # inverse CDF: the first token whose cumulative probability exceeds u * total (a token of
        # probability 0 adds nothing to the sum, so it is never the first to exceed it)
        cdf = np.cumsum(_softmax(z), axis=-1)
        u = self.rng.random(z.shape[0]) * cdf[:, -1]
        return [min(int(np.searchsorted(c, v, side="right")), V - 1) for c, v in zip(cdf, u)]
