"""Automatic k: how many tokens to draft at the current batch size, by a stated goodput model.

Goodput of drafting k tokens per request at batch size B::

    E(k)    = 1 + sum_{j=1..k} prod_{i=1..j} alpha_i       tokens per request and step
    T(B, k) = a + b * N + p(k) * (c + d * B)               seconds per step, N = B * (k + 1)
    G(B, k) = B * E(k) / T(B, k)                           tokens per second

``alpha_i`` is the measured probability that draft position i is accepted given that the ones
before it were (pooled over requests, decaying, starting from a prior). The step time has a
fixed part ``a``, the target's cost per scheduled token ``b`` (N tokens: B * (k + 1) in decode;
the fit sees prefill chunks too), and ``p(k)``
draft forwards of ``c + d * B`` each: k of them, and at k = 0 one that only keeps the draft's KV
cache in step, unless the drafter defers it (``draft_catch_up``, then p(0) = 0 and the tokens are
caught up inside a later pass). ``a, b, c, d`` are fitted by least squares to the step times the engine
measures (``StepCostModel``); the chosen k maximises G (ties to the smaller k). k = 0 wins when
drafting cannot pay: then no token is drafted or verified beyond the normal decode.

Everything here is plain Python/numpy, independent of vLLM; ``lvspec_vllm.patches.scheduler``
feeds it and applies the choice through vLLM's own per-batch-size k table.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np


def expected_tokens(alpha, k: int) -> float:
    """E(k): tokens emitted per request and step when k drafts are verified."""
    e, p = 1.0, 1.0
    for i in range(k):
        p *= alpha[i]
        e += p
    return e


def draft_passes(k, k0_pass: bool = True):
    """Draft forwards in a step that drafts k tokens (one at k = 0 if that step keeps the
    draft's KV cache in step)."""
    return np.maximum(k, 1 if k0_pass else 0)


@dataclass(frozen=True)
class Costs:
    """Seconds: a fixed, b per verified row, c + d * B per draft forward."""
    a: float
    b: float
    c: float
    d: float
    k0_pass: bool = True  # a k = 0 step runs a draft forward

    def step_time(self, batch, k):
        return self.a + self.b * batch * (k + 1) + \
            draft_passes(k, self.k0_pass) * (self.c + self.d * batch)


def goodput_table(alpha, costs: Costs, max_batch: int, k_max: int) -> np.ndarray:
    """[max_batch + 1, k_max + 1] tokens/s for every batch size and k (row 0 unused)."""
    e = np.array([expected_tokens(alpha, k) for k in range(k_max + 1)])
    batch = np.arange(max_batch + 1)[:, None].astype(float)
    k = np.arange(k_max + 1)[None, :]
    t = costs.step_time(batch, k)
    return batch * e[None, :] / np.maximum(t, 1e-9)


def choose_k(alpha, costs: Costs, max_batch: int, k_max: int) -> list[int]:
    """Best k for every batch size 0..max_batch (index 0 unused), ties to the smaller k."""
    g = goodput_table(alpha, costs, max_batch, k_max)
    best = g.max(axis=1, keepdims=True)
    # first k within a relative 1e-9 of the best: the smaller k on ties
    return [int(i) for i in np.argmax(g >= best * (1 - 1e-9), axis=1)]


class AcceptanceProfile:
    """alpha_i from accepted/reached counts per draft position, decayed, with a prior."""

    def __init__(self, k_max: int, prior: float = 0.5, prior_weight: float = 4.0,
                 decay: float = 0.995):
        self.reached = np.full(k_max, prior_weight)
        self.accepted = np.full(k_max, prior * prior_weight)
        self.decay = decay

    def update(self, drafted: list[int], accepted: list[int]) -> None:
        """One step: per request, drafts verified and how many of them were accepted."""
        self.reached *= self.decay
        self.accepted *= self.decay
        k_max = len(self.reached)
        for n, m in zip(drafted, accepted):
            n = min(n, k_max)
            m = min(m, n)
            self.reached[:min(m + 1, n)] += 1      # positions 1..m accepted, m+1 (if any) not
            self.accepted[:m] += 1

    def alpha(self) -> np.ndarray:
        return self.accepted / self.reached


class StepCostModel:
    """Least-squares fit of ``Costs`` to measured (batch, k, seconds), over a sliding window."""

    def __init__(self, window: int = 512, min_samples: int = 24, k0_pass: bool = True):
        self.samples: collections.deque = collections.deque(maxlen=window)
        self.min_samples = min_samples
        self.k0_pass = k0_pass

    def add(self, batch: int, k: int, tokens: int, seconds: float) -> None:
        """One step: running requests, k drafted, tokens the target computed, wall seconds."""
        self.samples.append((batch, k, tokens, seconds))

    def fit(self) -> Costs | None:
        """None until the samples can tell the four costs apart."""
        if len(self.samples) < self.min_samples:
            return None
        s = np.array(self.samples, dtype=float)
        batch, k, tokens, t = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        p = draft_passes(k, self.k0_pass)
        x = np.stack([np.ones_like(batch), tokens, p, p * batch], axis=1)
        if np.linalg.matrix_rank(x) < 4:
            return None
        # non-negative costs: a plain fit, then refit without any negative coefficient
        active = [0, 1, 2, 3]
        coef = np.zeros(4)
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active], t, rcond=None)
            if (sol >= 0).all():
                coef[active] = sol
                break
            active = [a for a, v in zip(active, sol) if v > 0] or []
        return Costs(*map(float, coef), k0_pass=self.k0_pass)


class AutoK:
    """Calibrate, then choose k per batch size from the measured acceptance and costs.

    Calibration visits every k in ``calibration_ks`` in turn (the costs are only identifiable
    when k varies); afterwards the best k is taken, except that every ``explore_every``-th step
    (two steps in a row with deferred k = 0 passes) tries a neighbouring k so the fit keeps
    seeing more than one k.
    """

    def __init__(self, k_max: int, max_batch: int, explore_every: int = 16,
                 calibration_steps: int = 48, k0_pass: bool = True):
        self.k_max = k_max
        self.max_batch = max_batch
        self.profile = AcceptanceProfile(k_max)
        self.costs = StepCostModel(k0_pass=k0_pass)
        self.explore_every = explore_every
        self.calibration_steps = calibration_steps
        ks = sorted({0, 1, max(1, k_max // 2), k_max})
        self.calibration_ks = ks
        self.table = [k_max] * (max_batch + 1)
        self.fitted: Costs | None = None
        self.steps = 0
        # With deferred k = 0 passes the first drafting step after k = 0 also catches the draft
        # up: its time is not what a step at that k costs, so it is left out of the fit, and
        # an exploration lasts two steps so that one of them is a plain sample.
        self.explore_steps = 1 if k0_pass else 2
        self.last_k: int | None = None

    def observe(self, batch: int, k: int, tokens: int, seconds: float | None,
                drafted: list[int], accepted: list[int]) -> None:
        resumed = not self.costs.k0_pass and self.last_k == 0 and k > 0
        self.last_k = k
        if seconds is not None and not resumed:
            self.costs.add(batch, k, tokens, seconds)
        if drafted:
            self.profile.update(drafted, accepted)
        self.steps += 1

    def next_table(self) -> list[int]:
        """The k per batch size to use for the next step."""
        if self.steps < self.calibration_steps:
            k = self.calibration_ks[self.steps % len(self.calibration_ks)]
            return [k] * (self.max_batch + 1)
        if self.steps % 8 == 0 or self.fitted is None:
            self.fitted = self.costs.fit() or self.fitted
            if self.fitted is not None:
                self.table = choose_k(self.profile.alpha(), self.fitted, self.max_batch,
                                      self.k_max)
        if self.steps % self.explore_every < self.explore_steps:
            nudge = 1 if (self.steps // self.explore_every) % 2 else -1
            return [min(self.k_max, max(0, k + nudge)) for k in self.table]
        return self.table
