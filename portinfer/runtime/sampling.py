"""Next-token selection: greedy, or sampled with temperature, top_k, top_p, min_p and a
repetition penalty, from a seeded generator (the same seed gives the same tokens).

The filters follow Hugging Face's semantics: repetition penalty divides positive logits of
seen tokens and multiplies negative ones; top_k keeps the k largest; top_p keeps the smallest
set whose probability reaches p; min_p drops tokens below min_p * the top probability.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None
                                   else int(torch.randint(0, 2 ** 62, (1,)).item()))

    def __call__(self, logits: torch.Tensor, seen: list) -> list[int]:
        """logits fp32 [B, V] (any device), seen: per sequence the token ids so far (needed only
        for the repetition penalty) -> next ids."""
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:  # numpy's argmax (SIMD, one thread), no copy
            return logits.detach().float().cpu().numpy().argmax(axis=-1).tolist()
        logits = logits.detach().float().cpu().clone()  # sampling is glue: [B, V] on the host
        if p.repetition_penalty != 1.0:
            for b, ids in enumerate(seen or ()):
                if ids:
                    idx = torch.tensor(sorted(set(ids)), dtype=torch.int64)
                    vals = logits[b, idx]
                    logits[b, idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:  # numpy's argmax (SIMD) is ~10x torch's over a vocabulary; both take the first maximum
            return logits.numpy().argmax(axis=-1).tolist()
        # float64, and an overflow to +inf clamped: finite fp32 logits near 3e38 over a small temperature
        # must not become inf - inf = NaN probabilities
        logits = torch.nan_to_num(logits.double() / p.temperature, posinf=torch.finfo(torch.float64).max)
        if p.top_k:
            k = min(p.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the tokens before it already reach top_p (the first is always kept)
            drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
        if p.min_p:
            probs = logits.softmax(dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, -math.inf)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).tolist()
