"""Automatic k: how many tokens to draft at the current batch size, by a stated goodput model.

Goodput of drafting k tokens per request at batch size B::

    E(k)    = 1 + sum_{j=1..k} prod_{i=1..j} alpha_i       tokens per request and step
    T_B(k)  = the engine's measured step time at B and k    seconds per step
    G(B, k) = B * E(k) / T_B(k)                            tokens per second

``alpha_i`` is the measured probability that draft position i is accepted given that the ones
before it were (over requests, decaying, starting from a prior), at the batch size B over a
whole output (``Acceptance``): counts per doubling of B and of the output position the drafts
were made at, combined over the L output tokens a request emits, because which requests draft,
and where in their output, differs with the load. The chosen k maximises G (ties to the
smaller k); k = 0 wins when drafting cannot pay: then no token is drafted or
verified beyond the normal decode. Two costs outside the steps are added per output token: a
request's last step drafts for a step it never has, (T_B(k) - T_B(0)) / B for each request
over the L output tokens a request emits (measured: output tokens per admitted request), which
with short outputs is a share of drafting's cost; and with cold requests the draft's prefill
of the requests that draft (below).

``T_B(k)`` is measured, not assumed (``StepCostModel``): around every batch size B of a grid (two
points per doubling), a weighted least-squares fit to the step times the engine measured, each
sample weighted by a Gaussian in log2(B_i / B) (width half a doubling), with

    t_i = T_B(k_i) + (s + s' * k_i) * (B_i - B) + f * prefill tokens_i

one level T_B(k) per k, a slope for the spread of batch sizes inside the window, and the cost
of the prefill chunks a step also computed (the decode step alone is what k changes; prefill
work is the same whatever k). A level with at least ``own_samples`` whole decode steps at the
grid point's own batch size is the median of the latest ``own_samples`` of them instead: the
slope assumes the neighbouring batch sizes ran under the same load, which at the edges of a
load level they did not, a step's noise only ever slows it, and the engine's speed drifts.
The engine's first decode step at each k is no sample (one-off costs), and samples are kept
divided by the engine's pace (``AutoK.pace``), so that a k measured before a slow moment of the
whole machine compares with a k = 0 measured in it.
No shape in k is assumed: a verify pass is flat in its rows until it turns compute-bound,
and a k = 0 step may or may not run a draft forward (vLLM's proposer runs one to keep the
draft's KV cache in step; ``draft_catch_up`` defers it). A k without
samples near B is interpolated linearly from the nearest measured k (the end's slope outside
them), and the levels are made non-decreasing in k. A batch size with fewer than two measured k
near it takes the nearest fitted one's levels. A k = 0 level is no dearer than one measured
at a larger batch size: fewer rows do no more work, and clients in step make the engine run
its first and last rows alone while their videos are decoded beside it. Borrowed and
extrapolated levels only guide a batch size where no k = 0 step was measured: where one was,
k is chosen from 0 up to the largest k measured there too (``StepTimes.allowed``), so a guess
never displaces the measured baseline, and the explorations one k up measure the next k in turn. (With cold requests, where running a
guess need not measure it, a batch size with nothing measured runs k = 0.) One linear model
over every batch size (this module's first form, T = a + b N + p(k) (c + d B)) does not fit a
real engine: on a 2-core CPU the many samples of large batches set its fixed part and its draft
cost at one request, and it chose k = 4 for one request where k = 1 was faster.

With cold requests (``draft_cold_requests``) a step at k > 0 may hold decode rows that do not
draft. Such a step is a sample all the same, or k = 0, once chosen, would never be measured
against again: every request admitted at k = 0 is cold, so a later step at k > 0 would mix
cold and warm rows for as long as the load lasts. A step at k where a share s of the decode
rows drafted is taken to cost

    T_B(0) + F_k + s V_k,        so that a whole step costs T_B(k) = T_B(0) + F_k + V_k:

the draft's passes and the verify's wider rows have a part that any drafting row brings in
(F_k: the draft's forward, its launches and the spec-decode bookkeeping, which on a 2-core CPU
cost as much as the target's step) and a part per drafting row (V_k). Samples at one share
alone tell only F_k + s V_k; the fit then leans on F_k (a small ridge on V_k), which a serving
trace bears out (at 4 and 16 requests a partly cold step at k = 1 took as long as a whole one).
A step at k > 0 where no decode row drafted is no sample of either level (the drafter's call
still costs, and takes vLLM's plain path).

The k is chosen at the share of the rows that would draft, not as if all did: the scheduler's
hook follows which running requests are warm (``WarmRequests``), and a step at k whose share s
of the decode rows draft emits B (1 + s (E(k) - 1)) tokens in T_B(0) + F_k + s V_k. With F_k
as dear as a k = 0 step, a few warm rows among cold ones do not pay for it (a 2-core CPU's
four requests ran such steps at 2-3.4 times a k = 0 one when whole steps were priced). One
exception: a batch size above the running requests is a step that admits new ones, and that
step's k decides whether they draft (a request admitted at k = 0 is cold for life), so there
the k is the whole step's, as long as whole steps also draft at the load's batch size (the
decayed mean of the steps' batch sizes): the newcomers' draft prefill pays only through the
drafting of later steps, which run at about that batch size, and a k > 0 at a batch size the
load only passes through (a fit's noise: on a 2-core CPU, k = 0 steps measured at two requests
while the API server took in new ones) would warm requests that never draft. Where whole
steps pay, the admitted requests turn warm, the share climbs and k follows; where they do not,
nothing changes. At a batch size at
k = 0 the share is that of the requests admitted in explorations (a request first scheduled
at k > 0 is warm, one at k = 0 cold), so there the explorations run on every turn, trying
1, k/2 and k in turn, and hold it ``cold_hold`` steps: a few more samples, more warm rows.

Explorations are paid from a budget (``AutoK.explore_budget``): an exploration starts only
while what the explorations cost, in seconds beyond what the table's k would have taken for
the tokens they emitted (by the fit and the measured acceptance), is at most a share of the
engine's time, both counted at the load's batch size (per doubling, decayed): a load's
explorations are paid from its own time, not from what cheaper ones at another load left
unspent (on a 2-core CPU one request's explorations, all cold, cost nothing, and four
requests' then ran at 3-7 % of their time against a budget of 1.5 %). With cold requests,
where the table's k is 0, the draft passes of the rows they warmed are theirs too. Where a k
off the table costs little, or pays, they run on every turn; where it is dear (a drafting
step at twice a plain one's cost, this CPU) they grow rare, and their cost stays near that
share instead of half the time. The share itself
shrinks where drafting is far from paying at the load's batch size (the best k > 0's goodput
under 0.9 of k = 0's, down to an eighth of the share at 0.5; ``AutoK.explore_share``):
explorations are how a change that makes drafting pay is found, and the farther it is, the less
likely such a change and the less finding it late costs. How near is the fit's reading, or,
where the table's k is 0 and lower, what the explorations that drafted there realised against
the table's own steps (``AutoK.realised_near``): the fit prices whole steps, while from k = 0
with cold requests an exploration runs partly cold steps and pays the draft's prefill of the
rows it warms.

Everything here is plain Python/numpy, independent of vLLM; ``lvspec_vllm.patches.scheduler``
feeds it and applies the choice through vLLM's own per-batch-size k table.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np


def expected_tokens(alpha, k: int) -> float:
    """E(k): tokens emitted per request and step when k drafts are verified."""
    e, p = 1.0, 1.0
    for i in range(k):
        p *= alpha[i]
        e += p
    return e


@dataclass(frozen=True)
class Costs:
    """A closed-form step time in seconds: fixed a, b per verified row, c + d * B per draft
    forward (k of them, and one at k = 0 unless the drafter defers it): the shape this
    module's first cost model assumed, now what the tests' simulated engines run on.
    ``choose_k`` takes it or the fitted ``StepTimes``."""
    a: float
    b: float
    c: float
    d: float
    k0_pass: bool = True  # a k = 0 step runs a draft forward

    def step_time(self, batch, k, share=1.0):
        """``share``: of the rows, those that draft (cold requests do not): a drafting step
        verifies k more tokens and drafts over those rows only; a k = 0 step is all rows'."""
        passes = np.maximum(k, 1 if self.k0_pass else 0)
        rows = np.where(np.asarray(k) > 0, share, 1.0) * batch
        return self.a + self.b * batch + self.b * rows * k + passes * (self.c + self.d * rows)


@dataclass(frozen=True)
class StepTimes:
    """Fitted seconds per step, ``times[i, k]`` at batch size ``grid[i]``; any other batch size
    takes the grid point nearest in log2."""
    grid: np.ndarray   # batch sizes, increasing
    times: np.ndarray  # [len(grid), k_max + 1]
    # seconds per prefill token that a k > 0 step adds over a k = 0 one (the draft's prefill,
    # when requests admitted at k = 0 skip it); 0 where not measured
    draft_prefill: np.ndarray | None = None  # [len(grid)]
    # [len(grid), k_max + 1]: k with samples near each grid point (its own, not borrowed)
    measured: np.ndarray | None = None
    # where k = 0 was not measured, may a borrowed or extrapolated level choose a k > 0?
    guess: bool = True
    # [len(grid), k_max + 1]: each level's standard error, from the fit's residuals
    spread: np.ndarray | None = None
    # [len(grid), k_max + 1]: the part of each level that a step's drafting rows bring in
    # (V_k; the rest, F_k, any drafting row does); None: all of it is fixed
    per_row: np.ndarray | None = None
    # [len(grid), k_max + 1]: levels that are the median of the grid point's own whole steps
    # (``StepCostModel._own_medians``), not the regression's
    own: np.ndarray | None = None

    def index(self, batch):
        b = np.log2(np.maximum(np.asarray(batch, dtype=float), 1.0))
        return np.abs(b[..., None] - np.log2(self.grid)).argmin(axis=-1)

    def step_time(self, batch, k, share=1.0):
        """Seconds of a step at k in which a ``share`` of the decode rows draft:
        T_B(0) + F_k + share V_k (a whole step at share 1)."""
        i = self.index(batch)
        t = self.times[i, k]
        if self.per_row is None or np.all(np.asarray(share) == 1.0):
            return t
        return t - (1.0 - np.asarray(share)) * self.per_row[i, k]

    def cautious(self, z: float) -> StepTimes:
        """The levels at k > 0 raised by ``z`` standard errors of their difference from the
        level at k = 0, for choosing: no speculation is the choice that cannot lose, and a k
        that beats it by less than its levels' noise (a few samples of a rare k, a machine
        whose speed drifts between them) is not known to pay. Explorations go on measuring,
        so a k that does pay is chosen once its samples bear it out."""
        if self.spread is None or not z:
            return self
        se = np.sqrt(self.spread ** 2 + self.spread[:, :1] ** 2)
        se[:, 0] = 0.0
        return replace(self, times=self.times + z * se)

    def allowed(self, batch) -> np.ndarray:
        """[..., k_max + 1]: the k that may be chosen at these batch sizes: 0, and none above
        the largest k measured near the batch size. A level beyond it is borrowed from other
        batch sizes or extrapolated from other k, and a guess must not displace a measured
        baseline (explorations measure one k more in turn). Where k = 0 was not measured
        either, every k if ``guess`` (running the guess measures it), else only 0.

        Without ``guess`` (cold requests) also none below the smallest k > 0 measured: the
        line from k = 0 to it spreads a drafting step's fixed part over the k below, and
        makes them look cheap (on a 2-core CPU, at one request, k = 0 and 4 measured at 3.5
        and 11 ms read k = 2 at 7.2 ms; its steps took 8.2-9.2). With guesses the chosen k is
        measured at its next step; with cold requests the rows admitted at it turn warm and
        pay the draft's prefill first, and explorations measure 1, k/2 and k in turn."""
        shape = np.shape(batch) + (self.times.shape[1],)
        if self.measured is None:
            return np.ones(shape, dtype=bool)
        seen = self.measured[self.index(batch)]
        ks = np.arange(shape[-1])
        top = np.where(seen, ks, 0).max(axis=-1, keepdims=True)
        ok = (ks <= top) | (self.guess & ~seen[..., :1])
        if not self.guess:
            drafting = seen & (ks > 0)
            low = np.where(drafting, ks, shape[-1]).min(axis=-1, keepdims=True)
            ok &= (ks == 0) | (ks >= low)
        return ok


def goodput_table(alpha, costs, max_batch: int, k_max: int,
                  admission=None, tokens_per_request: float | None = None,
                  share: float = 1.0) -> np.ndarray:
    """[max_batch + 1, k_max + 1] tokens/s for every batch size and k (row 0 unused).
    ``admission[B]``: seconds per output token that drafting adds at batch size B beyond the
    step itself (the draft's prefill of the requests it admits), paid by every k > 0.
    ``tokens_per_request``: output tokens a request emits (None: as if unbounded). A request's
    last step still drafts for a next one it never has, so each request that drafts pays the
    drafting part of one step, T(B, k) - T(B, 0) over its B rows, for no tokens; with short
    outputs that is a share of drafting's cost that the steps alone do not show.
    ``share``: of the decode rows, those that would draft (cold requests do not): a step at k
    emits B (1 + share (E(k) - 1)) tokens in T_B(0) + F_k + share V_k. ``alpha``: per draft
    position, or [max_batch + 1, k_max] per batch size (``Acceptance.per_batch``)."""
    alpha = np.asarray(alpha, dtype=float)[..., :k_max]
    # E(k) for k = 0..k_max, per batch size where alpha has one row per batch size
    reach = np.cumprod(alpha, axis=-1)
    e = 1.0 + np.concatenate([np.zeros(alpha.shape[:-1] + (1,)), reach.cumsum(axis=-1)], -1)
    e = 1.0 + share * (e - 1.0)
    batch = np.arange(max_batch + 1)[:, None].astype(float)
    k = np.arange(k_max + 1)[None, :]
    t = costs.step_time(batch, k) if share == 1.0 else costs.step_time(batch, k, share)
    per_token = t / np.maximum(batch * np.atleast_2d(e), 1e-9)
    if admission is not None:
        per_token = per_token + np.asarray(admission, dtype=float)[:, None] * (k > 0)
    if tokens_per_request:
        per_token = per_token + np.maximum(t - t[:, :1], 0.0) / np.maximum(
            batch * tokens_per_request, 1e-9)
    return 1.0 / np.maximum(per_token, 1e-12)


def choose_k(alpha, costs, max_batch: int, k_max: int, admission=None,
             tokens_per_request: float | None = None, share: float = 1.0) -> list[int]:
    """Best k for every batch size 0..max_batch (index 0 unused), ties to the smaller k."""
    g = goodput_table(alpha, costs, max_batch, k_max, admission, tokens_per_request, share)
    if isinstance(costs, StepTimes):
        g = np.where(costs.allowed(np.arange(max_batch + 1)), g, -np.inf)
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
        self.add(_position_counts(drafted, accepted, len(self.reached)) if len(drafted)
                 else None)

    def add(self, counts: tuple[np.ndarray, np.ndarray] | None) -> None:
        """One step's ``_position_counts`` (None: a step without drafts), after the decay."""
        self.reached *= self.decay
        self.accepted *= self.decay
        if counts is not None:
            self.reached += counts[0]
            self.accepted += counts[1]

    def alpha(self) -> np.ndarray:
        return self.accepted / self.reached


def _position_counts(drafted, accepted, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per draft position, the requests that reached it and those whose draft there was
    accepted: positions 1..m accepted, m + 1 (if drafted) not, so position i counts the
    requests whose cut-off exceeds it (a suffix sum of the cut-offs' histogram)."""
    n = np.minimum(drafted, k_max)
    m = np.minimum(accepted, n)
    return tuple(np.bincount(cut, minlength=k_max + 1)[::-1].cumsum()[::-1][1:]
                 for cut in (np.minimum(m + 1, n), m))


def _doubling(n, last: int, unit: int = 1):
    """The doubling of ``n / unit`` that ``n`` (an int or an array) falls in, with every n
    below 2 unit in the first, and none past ``last``: batch sizes by 1, 2-3, 4-7 ... (unit
    1), output positions by 0-7, 8-15, 16-31 ... (unit 4)."""
    if isinstance(n, (int, np.integer)):
        return min(max(int(n) // unit, 1).bit_length() - 1, last)
    # frexp's exponent e: 2**(e - 1) <= x < 2**e, exactly
    return np.minimum(np.frexp(np.maximum(np.asarray(n) // unit, 1))[1] - 1, last)


class Acceptance:
    """alpha_i at a batch size over a request's output: counts per doubling of the batch size
    (1, 2-3, 4-7, ...) and of the output position the drafts were made at (0-7, 8-15, ...),
    each decayed over its own drafting steps and read through a prior worth ``weight``
    reached drafts: a position's counts over every batch size, which read those at it and
    later positions (past the last position with drafts, at that one), which read the pooled
    profile.

    Where drafting happens shapes what it accepts. Under load with cold requests the steps that
    draft are mostly explorations', within a few steps of their requests' admission, early in
    their output, where a caption is most predictable; at one request whole outputs draft.
    Pooled, the profile carried the first into the choice at one request (a 2-core CPU's
    serving run: E(4) read 3.9 there, where that batch size's own steps emitted 2.9 tokens a
    row). Per batch size the bias stayed, as explorations at one request also warm the request
    they admit (3.57 tokens a row in the first 8 output tokens, 2.29-3.24 later). So the table
    reads a batch size's acceptance over a whole output of ``length`` tokens: E(k) per output
    position, combined as the steps spend them, the harmonic mean weighted by the tokens of
    [0, length) in each (a position that emits more tokens a step takes fewer steps). A
    bucket decays over its own drafting steps only: acceptance is a property of the requests,
    not of the clock, and a batch size the load left keeps what was measured there."""

    POSITIONS = 7  # output positions 0-7, 8-15, ..., 128-255, 256 on

    def __init__(self, k_max: int, max_batch: int, weight: float = 16.0,
                 decay: float = 0.995):
        self.pooled = AcceptanceProfile(k_max, decay=decay)
        self._last_batch = max(int(max_batch), 1).bit_length() - 1
        # [reached, accepted] per batch size's doubling, output position's, draft position
        self._counts = np.zeros((2, self._last_batch + 1, self.POSITIONS, k_max))
        self.reached, self.accepted = self._counts
        self.weight = weight
        self.decay = decay
        # the tokens of each position bucket: [start, end) per bucket, the last open
        edges = [0] + [8 << i for i in range(self.POSITIONS - 1)] + [np.inf]
        self._starts, self._ends = np.array(edges[:-1]), np.array(edges[1:])
        # per output position up to the last bucket's start, its bucket times a histogram
        # row's width (k_max + 1 cut-offs): a lookup, as update runs at every drafting step
        self._position_offset = _doubling(np.arange(edges[-2] + 1), self.POSITIONS - 1,
                                          unit=4) * (k_max + 1)

    def update(self, batch: int, drafted: list[int], accepted: list[int],
               positions: list[int] | None = None) -> None:
        """One step at ``batch`` running requests: per request, drafts verified and accepted,
        and the output tokens it had before the step (None: all at the start)."""
        if not len(drafted):
            self.pooled.add(None)
            return
        # _position_counts per output position, in one histogram of the rows' cut-offs
        # (reached, then accepted), and its suffix sums
        k_max, width = self._counts.shape[-1], self._counts.shape[-1] + 1
        half = self.POSITIONS * width
        rows = np.array([drafted, accepted, positions or [0] * len(drafted)])
        n = np.minimum(rows[0], k_max)
        m = np.minimum(rows[1], n)
        at = self._position_offset[np.minimum(rows[2], len(self._position_offset) - 1)]
        counts = np.bincount(np.concatenate([at + np.minimum(m + 1, n), at + m + half]),
                             minlength=2 * half).reshape(2, self.POSITIONS, width)
        counts = counts[..., ::-1].cumsum(-1)[..., -2::-1]  # [2, POSITIONS, k_max]
        self.pooled.add(counts.sum(1))
        # a position's cells decay only where rows drafted at it
        cells = self._counts[:, _doubling(int(batch), self._last_batch)]
        cells *= np.where(counts[0, :, :1] > 0, self.decay, 1.0)
        cells += counts

    def per_batch(self, batch, length: float | None = None) -> np.ndarray:
        """[..., k_max]: alpha at each of ``batch`` (an int, or an array of batch sizes) over
        an output of ``length`` tokens: the alpha whose E(k) is, for every k, the harmonic mean
        of the positions' E(k) weighted by their tokens in [0, length). ``length`` None: over
        the positions as they were drafted at (each batch size's counts summed)."""
        i = _doubling(batch, self._last_batch)
        pooled = self.pooled.alpha()
        w = self.weight
        if length is None:
            return (self.accepted[i].sum(-2) + w * pooled) / (self.reached[i].sum(-2) + w)
        # A position over every batch size, read through the drafts made at it or later (past
        # the last position with drafts, at that one), through the pooled profile; then at a
        # batch size, through that. Later, not all: an unmeasured stretch of the output
        # (explorations draft near its start) would otherwise read the start's acceptance,
        # the highest, and the reading that errs low costs no more than k = 0 does.
        acc, reached = self.accepted.sum(0), self.reached.sum(0)          # [P, k_max]
        drafted = np.flatnonzero(reached[:, 0] > 0)
        last = drafted[-1] if len(drafted) else 0
        keep = np.minimum(np.arange(len(reached)), last)
        later = [c[::-1].cumsum(0)[::-1][keep] for c in (acc, reached)]
        at = (acc + w * (later[0] + w * pooled) / (later[1] + w)) / (reached + w)
        at = (self.accepted[i] + w * at) / (self.reached[i] + w)          # [..., P, k_max]
        e = 1.0 + np.cumsum(np.cumprod(at, axis=-1), axis=-1)            # E(1..k_max)
        tokens = np.clip(max(float(length), 1.0), self._starts, self._ends) - self._starts
        e = tokens.sum() / (tokens[:, None] / e).sum(-2)                  # [..., k_max]
        reach = np.diff(e, prepend=1.0, axis=-1)
        return reach / np.concatenate([np.ones(reach.shape[:-1] + (1,)), reach[..., :-1]], -1)

class StepCostModel:
    """``StepTimes`` fitted to measured (batch, k, prefill tokens, seconds) by local regression
    in the batch size (see the module docstring). Samples are kept per grid point, the latest
    ``window`` of each k at each, so a batch size the load left long ago keeps what was
    measured there, and a k the engine runs rarely (an exploration's, or k = 0 where the
    engine drafts) keeps its samples, and stays measured, until newer ones of the same k
    replace them, instead of being crowded out by the k it runs; age only weighs them less."""

    def __init__(self, k_max: int, max_batch: int, window: int = 64, min_samples: int = 24,
                 width: float = 0.5, min_weight: float = 2.0, half_life: float = 512.0,
                 split_prefill: bool = False, guess: bool = True, ridge: float = 0.25,
                 own_samples: int = 16):
        self.k_max = k_max
        self.guess = guess  # StepTimes.guess
        # prefill priced apart at k = 0 and k > 0 (draft_cold_requests: only requests admitted
        # at k > 0 run the draft's prefill), which yields StepTimes.draft_prefill
        self.split_prefill = split_prefill
        self.min_samples = min_samples
        # a level with this many whole steps at the grid point's own batch size is the median
        # of the latest this many (_own_medians)
        self.own_samples = own_samples
        self.width = width
        # a grid point is fitted where at least two k have this much weight of samples near it
        self.min_weight = min_weight
        points = np.round(2.0 ** np.arange(0, np.log2(max(max_batch, 1)) + 0.5, 0.5))
        self.grid = np.unique(np.clip(points, 1, max(max_batch, 1)))
        # per batch size its nearest grid point in log2 (add runs every step)
        self._grid_index = np.abs(np.log2(np.arange(1, max(max_batch, 1) + 1))[:, None]
                                  - np.log2(self.grid)).argmin(axis=1).tolist()
        self._grid_index.insert(0, self._grid_index[0])
        # per grid point and k a ring of (batch, k, prefill tokens, seconds, sample number,
        # share) rows
        self._rows = np.zeros((len(self.grid), k_max + 1, window, 6))
        self._added = np.zeros((len(self.grid), k_max + 1), dtype=int)
        self._count = 0
        self._pending: list[tuple] = []  # samples added since the rows were last read
        # older samples weigh less (halved every half_life samples): the engine's speed drifts,
        # and a k measured once in a slow moment must not speak for it for ever
        self.half_life = half_life
        # the ridge on V_k, in samples' weight: samples at one share tell F_k + s V_k only,
        # and are read as F_k until their shares differ by more than noise (module docstring)
        self.ridge = ridge
        # samples farther than this many grid points weigh under 1e-3: left out of a point's fit
        self._reach = int(np.ceil(2 * width * np.sqrt(2 * np.log(1e3))))
        # per grid point, its last fit (times, draft_prefill, measured, spread) and whether a
        # bucket it reads changed since
        n = len(self.grid)
        self._fits = (np.full((n, k_max + 1), np.nan), np.zeros(n),
                      np.zeros((n, k_max + 1), dtype=bool), np.zeros((n, k_max + 1)),
                      np.zeros((n, k_max + 1)), np.zeros((n, k_max + 1), dtype=bool))
        self._dirty = np.zeros(n, dtype=bool)

    def _bucket(self, g: int) -> np.ndarray:
        self._flush()
        kept = np.arange(self._rows.shape[2]) < self._added[g][:, None]
        return self._rows[g][kept]

    def own_steps(self, batch: int) -> dict[int, np.ndarray]:
        """Per k, the seconds of the kept whole decode-only steps (no prefill, every decode row
        drafting) at exactly this batch size."""
        return _whole_steps(self._bucket(self._grid_index[min(max(batch, 1),
                                                              len(self._grid_index) - 1)]),
                            batch)

    @property
    def samples(self) -> list[tuple]:
        """(batch, k, prefill tokens, seconds, share) of the kept samples, oldest first."""
        rows = [r for g in range(len(self.grid)) for r in self._bucket(g)]
        return [tuple(r[[0, 1, 2, 3, 5]]) for r in sorted(rows, key=lambda r: r[4])]

    def add(self, batch: int, k: int, seconds: float, prefill: int = 0,
            share: float = 1.0) -> None:
        """One step: running requests, k drafted, prefill tokens computed, wall seconds, and
        the share of its decode rows that drafted (cold requests do not: see the module
        docstring; a step at k > 0 with share 0 is no sample)."""
        if k and share <= 0:  # all rows cold: neither a k = 0 step nor one that drafted
            return
        # kept as a tuple until read (_flush): this runs in the engine's step loop, where a
        # write into the numpy rows cost several times what an append does
        self._pending.append((batch, min(k, self.k_max), prefill, seconds, share))

    def _flush(self) -> None:
        rows, added, window = self._rows, self._added, self._rows.shape[2]
        last = len(self._grid_index) - 1
        for batch, k, prefill, seconds, share in self._pending:
            g = self._grid_index[min(max(batch, 1), last)]
            rows[g, k, added[g, k] % window] = (batch, k, prefill, seconds, self._count, share)
            added[g, k] += 1
            self._count += 1
            self._dirty[g] = True
        self._pending.clear()

    def _own_medians(self, bucket: np.ndarray, b0: float,
                     level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The levels measured often at the grid point's own batch size: the median of the
        latest ``own_samples`` of those steps (whole, no prefill), not the regression's, and
        its standard error (NaN where the regression's level stands). The slope that carries
        neighbouring batch sizes' samples to this one assumes they ran under the same load; at
        the edges of a load level they did not (the API server decodes arriving videos on the
        same CPUs), and on a 2-core CPU the fit put T(1, 4) at 19 ms where 64 steps at one
        request took 29 ms. The median, as a
        step's noise only ever slows it; its standard error from the steps' median absolute
        deviation, as the regression's pooled residuals are what those loads blew up. The
        latest only, as the engine's speed drifts: where the table drafts, k = 0 is measured
        by a baseline exploration's one step a turn of three, and a k = 0 level from a slow
        moment that was the median of all 64 kept (``window``) stayed for over a thousand steps
        after it on the cold-engine simulation, with the table drafting where it did not pay
        (on a 2-core CPU: a k = 0 step at one request read as 5.3 ms where it took 3.0-3.5, a
        load of one request at k = 4 for a whole level)."""
        out, se = level.copy(), np.full(len(level), np.nan)
        for kk, mine in _whole_steps(bucket, b0).items():
            if len(mine) >= self.own_samples:
                mine = mine[-self.own_samples:]
                out[kk] = np.median(mine)
                # 1.4826 MAD: a normal's sigma; 1.2533 sigma / sqrt(n): the median's error
                mad = np.median(np.abs(mine - out[kk]))
                se[kk] = 1.2533 * 1.4826 * mad / np.sqrt(len(mine))
        return out, se

    def fit(self) -> StepTimes | None:
        """None until some batch size has samples at two or more k."""
        self._flush()
        if np.minimum(self._added, self._rows.shape[2]).sum() < self.min_samples:
            return None
        ks = np.arange(self.k_max + 1)
        # a grid point's fit reads only the buckets within reach, its sample ages included:
        # refit the points near a bucket that changed, keep the others' (the engine's batch
        # size moves slowly, and the fit runs in the engine's step loop)
        times, draft_prefill, measured, spread, per_row, own = self._fits
        stale = np.zeros(len(self.grid), dtype=bool)
        for i in np.flatnonzero(self._dirty):
            stale[max(0, i - self._reach):i + self._reach + 1] = True
        self._dirty[:] = False
        buckets = {}  # read once per fit
        for i in np.flatnonzero(stale):
            for j in range(max(0, i - self._reach), min(len(self.grid), i + self._reach + 1)):
                if j not in buckets:
                    buckets[j] = self._bucket(j)
        for g in np.flatnonzero(stale):
            b0 = self.grid[g]
            times[g], draft_prefill[g], measured[g], spread[g] = np.nan, 0.0, False, 0.0
            own[g] = False
            per_row[g] = 0.0
            near = range(max(0, g - self._reach), min(len(self.grid), g + self._reach + 1))
            batch, k, prefill, t, number, share = np.concatenate(
                [buckets[i] for i in near]).T
            k = k.astype(int)
            if not len(batch):
                continue
            # ages from the newest sample near this batch size: what the load left long ago
            # keeps its weight until newer samples arrive
            near_b0 = np.exp(-0.5 * (np.log2(batch / b0) / self.width) ** 2)
            w = near_b0 * 0.5 ** ((number.max() - number) / self.half_life)
            # A k is measured here if samples near enough were kept, however old: age only
            # weighs newer samples over older ones. (Aged out, the k = 0 level at a batch size
            # that drafts, where baseline explorations are rare, would be extrapolated from the
            # k > 0 levels: far too high, and drafting would look cheap.) Every sample weighs
            # for its own k, whatever share of its rows drafted.
            seen = np.bincount(k, near_b0, minlength=len(ks)) >= self.min_weight
            measured[g] = seen
            if seen.sum() < 2:
                continue
            # one level per k (no shape in k assumed: a verify pass can be flat in its rows
            # until it turns compute-bound), a slope in the batch size per k, the prefill
            # tokens' cost. Batch sizes are centred on their weighted mean, so with one batch
            # size in the window the slope columns vanish (least squares' minimum norm gives
            # them 0) and the fit is that batch size's levels.
            centre = float((w * batch).sum() / w.sum())
            delta = batch - centre
            columns = [delta, delta * k * share]
            columns += [prefill * (k == 0), prefill * (k > 0)] if self.split_prefill \
                else [prefill]
            # the weighted normal equations (a 13 x 13 solve for k <= 8); the pseudo-inverse
            # keeps the minimum-norm solution where columns are absent
            xtx, xty = _normal_equations(k, share, np.stack(columns), w, t, len(ks),
                                         self.ridge)
            coef = np.linalg.pinv(xtx, hermitian=True) @ xty
            n = len(ks)
            # T(0) = L0, T(k) = L0 + F_k + V_k: a whole step at k
            level = coef[0] + np.concatenate([[0.0], coef[1:n] + coef[n:2 * n - 1]])
            slope, slope_k = coef[2 * n - 1], coef[2 * n]
            regressed = level + (slope + slope_k * ks) * (b0 - centre)
            level, own_se = self._own_medians(buckets[g], b0, regressed)
            own[g] = ~np.isnan(own_se)
            times[g] = _fill_unseen(level, seen)
            per_row[g] = _per_row(coef[n:2 * n - 1], regressed, times[g], seen)
            spread[g] = _level_spread(coef, k, share, np.stack(columns), w, t, seen, times[g])
            se = np.where(np.isnan(own_se), spread[g], own_se)
            spread[g] = np.where(seen, se, se[seen].max())
            if self.split_prefill:
                # both sides need prefill samples of their own, or the difference is the
                # whole prefill's cost (an absent column's coefficient is 0)
                has = [(w * (prefill > 0) * side).sum() >= self.min_weight
                       for side in (k == 0, k > 0)]
                if all(has):
                    draft_prefill[g] = max(coef[-1] - coef[-2], 0.0)
        fitted = ~np.isnan(times[:, 0])
        if not fitted.any():
            return None
        # grid points without samples at two k near them take the nearest fitted point's times
        where = np.log2(self.grid[fitted])
        nearest = np.abs(np.log2(self.grid)[:, None] - where[None, :]).argmin(axis=1)
        return StepTimes(self.grid,
                         _k0_bounded_by_larger_batches(times[fitted][nearest],
                                                       fitted & measured[:, 0]),
                         draft_prefill[fitted][nearest] if self.split_prefill else None,
                         measured.copy(), self.guess, spread[fitted][nearest],
                         per_row[fitted][nearest], own.copy())


class DraftPassCost:
    """What a prompt token costs the draft, from the drafter's own clock (``draft_cold_requests``).

    Each sample is one propose call that ran the draft: its k, the requests it ran, its prompt
    tokens (prefill chunks of requests that draft), its other first-pass tokens (decode rows and
    the tokens they catch up) and its seconds. The calls without prompt tokens fit, by decayed
    least squares, one level per k and a cost per request and per other token; the price is the
    median, over the latest ``window`` calls with prompt tokens, of what each cost above that
    fit, per prompt token. The median, because the first calls of a new prompt shape also pay
    one-time costs (the encoder's and kernels' first runs) that a mean would keep for long.
    Unlike the engine's step times this measures prefill at one request too, where every
    prefill step follows an idle engine and is no step-time sample.
    """

    def __init__(self, k_max: int, window: int = 32, decay: float = 0.998,
                 min_weight: float = 2.0):
        self.k_max = k_max
        n = k_max + 1 + 2
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self._k_weight = np.zeros(k_max + 1)  # decayed count of calls without prompt tokens
        # calls with prompt tokens: (k, row, prompt tokens, seconds)
        self._prompted: deque[tuple[int, np.ndarray, int, float]] = deque(maxlen=window)
        self.decay = decay
        self.min_weight = min_weight
        self.count = 0
        self._ready = False

    def _row(self, k: int, rows: int, other: int) -> np.ndarray:
        x = np.zeros(len(self._xty))
        x[min(k, self.k_max)] = 1.0
        x[-2:] = (rows, other)
        return x

    def add(self, k: int, rows: int, prompt: int, other: int, seconds: float) -> None:
        x = self._row(k, rows, other)
        self.count += 1
        k = min(k, self.k_max)
        if prompt > 0:
            self._prompted.append((k, x, prompt, seconds))
        else:
            self._xtx = self._xtx * self.decay + np.outer(x, x)
            self._xty = self._xty * self.decay + x * seconds
            self._k_weight *= self.decay
            self._k_weight[k] += 1.0
        weight, least = self._k_weight, self.min_weight
        self._ready = any(weight[c[0]] >= least for c in self._prompted)

    def _priced(self) -> list[tuple[int, np.ndarray, int, float]]:
        # calls with prompt tokens at a k whose level was measured without them
        return [c for c in self._prompted if self._k_weight[c[0]] >= self.min_weight]

    @property
    def ready(self) -> bool:
        """A call with prompt tokens was timed at a k measured without them too (kept by
        ``add``: the scheduler's hook asks every step)."""
        return self._ready

    def price(self) -> float | None:
        """Seconds per prompt token, or None until ``ready``."""
        calls = self._priced()
        if not calls:
            return None
        # rcond: with one request per call the request column is the level columns' sum
        coef = np.linalg.pinv(self._xtx, rcond=1e-10, hermitian=True) @ self._xty
        return max(float(np.median([(t - x @ coef) / n for _, x, n, t in calls])), 0.0)


def _normal_equations(k, share, cols, w, t, n, ridge):
    """X'WX (plus ``ridge`` on the V_k) and X'Wt for t = L0 + F_k + s V_k + cols (a step at
    k = 0: L0 alone); unknowns [L0, F_1..F_{n-1}, V_1..V_{n-1}, cols]. By bincount, as the
    level part of X has at most three entries a row."""
    def per_k(values):  # sums over the samples at each k > 0
        return np.bincount(k, values, minlength=n)[1:]

    m = len(cols)
    fk, vk = np.arange(1, n), np.arange(n, 2 * n - 1)  # F_k, V_k
    c = slice(2 * n - 1, 2 * n - 1 + m)
    xtx = np.zeros((2 * n - 1 + m, 2 * n - 1 + m))
    xtx[0, 0] = w.sum()
    xtx[0, fk] = xtx[fk, 0] = xtx[fk, fk] = per_k(w)
    xtx[0, vk] = xtx[vk, 0] = xtx[fk, vk] = xtx[vk, fk] = per_k(w * share)
    xtx[vk, vk] = per_k(w * share * share) + ridge
    wcols = cols * w
    xtx[0, c] = wcols.sum(axis=1)
    xtx[fk, c] = np.stack([per_k(col) for col in wcols], axis=1)
    xtx[vk, c] = np.stack([per_k(col * share) for col in wcols], axis=1)
    xtx[c, :c.start] = xtx[:c.start, c].T
    xtx[c, c] = wcols @ cols.T
    xty = np.concatenate([[(w * t).sum()], per_k(w * t), per_k(w * share * t), wcols @ t])
    return xtx, xty


def decode_share(k: int, previous_k: int, drafts: list[int], cold: bool) -> float | None:
    """What a step at k is a sample of, from the drafts each decode row verified: the share of
    its decode rows that drafted (1: a whole step at k), or None if it is no sample of any k.

    A step verifies the previous step's drafts and drafts its own, so only a step that keeps
    the previous step's k costs what a step at k costs (the first step after a k = 0 one also
    catches the draft up). With cold requests (``cold``) a decode row with no drafts after a
    step at the same k is cold: it neither verifies nor drafts. A row whose drafts were cut
    short (fewer than k, but some) makes the step no sample."""
    if k != previous_k:
        return None
    if not k or all(n == k for n in drafts):
        return 1.0
    if cold and all(n in (0, k) for n in drafts):
        return sum(n == k for n in drafts) / len(drafts)
    return None


def _whole_steps(bucket: np.ndarray, batch: float) -> dict[int, np.ndarray]:
    """Per k, the seconds of a bucket's whole decode-only steps at exactly ``batch``, oldest
    first."""
    bucket = bucket[np.argsort(bucket[:, 4], kind="stable")]
    b, k, prefill, t, _, share = bucket.T
    own = (b == batch) & (prefill == 0) & (share == 1.0)
    return {int(kk): t[own & (k == kk)] for kk in np.unique(k[own])}


def _per_row(v, regressed, level, seen) -> np.ndarray:
    """V_k at the fitted levels: the fit's share of each whole level's drafting part (its
    level above k = 0) that came per drafting row, applied to the level that stands (the
    median where it replaced the regression's). A k without samples takes the smallest share
    of the measured ones: the rest of a guessed step is fixed, the dearer reading of a partly
    cold step. Where every sample drafted on all rows the ridge leaves V at about 0."""
    drafting = regressed[1:] - regressed[0]
    frac = np.clip(v / np.where(drafting > 1e-9, drafting, np.inf), 0.0, 1.0)
    mine = seen[1:]
    frac = np.where(mine, frac, frac[mine].min() if mine.any() else 0.0)
    return np.concatenate([[0.0], frac * np.maximum(level[1:] - level[0], 0.0)])


def _level_spread(coef, k, share, cols, w, t, seen, level) -> np.ndarray:
    """Each level's standard error at a grid point: the fit's relative residual spread, pooled
    over every k (one k's few samples alone would fit themselves), times the level, over the
    square root of that k's effective sample count (its Gaussian- and age-weighted samples).
    A k without samples of its own takes the largest of the measured ones'. A residual is
    relative to the larger of the prediction and the step's own seconds: a sample far from the
    grid point can be predicted at 0 or below (the slope carried that far), and a share of
    that would make the spread, and the caution on every k > 0, thousands of times too large
    (a 2-core CPU's serving run logged 766 ms against levels of 6-20 ms)."""
    n = len(level)
    f = np.concatenate([[0.0], coef[1:n]])[k]
    v = np.concatenate([[0.0], coef[n:2 * n - 1]])[k]
    predicted = coef[0] + f + share * v + coef[2 * n - 1:] @ cols
    relative = (t - predicted) / np.maximum(np.maximum(predicted, t), 1e-6)
    # degrees of freedom: the effective sample count less the fitted levels and columns
    total = w.sum() ** 2 / max((w * w).sum(), 1e-12)
    fitted = 2 * int(seen.sum()) - 1 + len(cols)
    cv2 = (w * relative ** 2).sum() / w.sum() * total / max(total - fitted, 1.0)
    sums, squares = np.bincount(k, w, minlength=n), np.bincount(k, w * w, minlength=n)
    effective = np.where(squares > 0, sums ** 2 / np.maximum(squares, 1e-12), 0.0)
    se = np.sqrt(cv2) * level / np.sqrt(np.maximum(effective, 1e-12))
    return np.where(seen, se, se[seen].max())


def _k0_bounded_by_larger_batches(times: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """The levels with k = 0's no dearer than a k = 0 level measured at a larger batch size
    (``measured``: [grid points], k = 0 fitted there from samples of its own): a
    step over fewer rows does no more work, so a level above that reads something else.
    Where requests arrive together (clients in step), the API server decodes their videos on
    the same CPUs while the engine runs its first and last rows alone: on a 2-core CPU at
    four requests the k = 0 steps at one request took 7-8 ms against 3.9 at four, and the
    table drafted at k = 4 at one request, on rows that then stayed warm (a server switched
    between ``auto_k`` and the k = 0 engine read 0.92x of the latter there, docs/benchmarks.md
    s38). Only k = 0 is bounded: the bound never makes drafting look cheaper (no speculation
    is the choice that cannot lose), and a k > 0 level stays above it (levels rise in k)."""
    bound = np.where(measured, times[:, 0], np.inf)
    out = times.copy()
    out[:, 0] = np.minimum(times[:, 0], np.minimum.accumulate(bound[::-1])[::-1])
    return out


def _fill_unseen(level: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Levels of the k without samples, linearly from the nearest two seen k (inside the seen
    range: between its neighbours; outside: the end's slope), then non-decreasing in k:
    drafting more never makes a step cheaper, whatever the noise says."""
    ks = np.flatnonzero(seen)
    out = np.interp(np.arange(len(level)), ks, level[ks])
    lo, hi = ks[:2], ks[-2:]
    below, above = np.arange(ks[0]), np.arange(ks[-1] + 1, len(level))
    out[below] = level[lo[0]] + (below - lo[0]) * (level[lo[1]] - level[lo[0]]) / (lo[1] - lo[0])
    out[above] = level[hi[1]] + (above - hi[1]) * (level[hi[1]] - level[hi[0]]) / (hi[1] - hi[0])
    return np.maximum.accumulate(np.maximum(out, 1e-6))


class WarmRequests:
    """Which running requests would draft, as the scheduler sees them (``drafter/cold.py``'s
    rule): one first scheduled in a step at k = 0 is cold, and so is one that holds no drafts
    after a step at the same k > 0 that it ran in (the drafter made it cold: its reused prefix
    holds a cold request's KV). ``step`` gives the share of the requests a step leaves running
    that are warm: the share of the next step's decode rows that would draft."""

    def __init__(self):
        self.cold: set[str] = set()
        self._last: set[str] = set()  # the requests the previous step ran

    def step(self, k: int, previous_k: int | None, admitted, drafts: dict[str, int],
             running, finished) -> float:
        """``admitted``: requests first scheduled in this step; ``drafts``: per decode row, the
        drafts it verified; ``running``: this step's requests that go on, ``finished``: those
        that ended in it."""
        if k == 0:
            self.cold.update(admitted)
        elif k == previous_k:
            self.cold.update(r for r, n in drafts.items() if n == 0 and r in self._last)
        self.cold.difference_update(finished)
        self._last = set(running)
        if not self._last:
            return 1.0
        return 1.0 - len(self._last & self.cold) / len(self._last)

    def forget(self, live) -> None:
        """Keep only the requests in ``live`` (aborted ones never finish in a step)."""
        self.cold.intersection_update(live)


class AutoK:
    """Calibrate, then choose k per batch size from the measured acceptance and costs.

    A step verifies the drafts of the step before and drafts its own, so only a step whose k
    equals the previous step's costs what a step at that k costs; the step after a switch also
    pays for the switch (with deferred k = 0 passes, the catching up), and is left out of the
    fit. Calibration therefore holds each k in ``calibration_ks`` for ``hold`` steps in turn
    (the costs are only identifiable when k varies), and every ``explore_every``-th step starts
    two steps at another k, in turn one more, one less and 0, so that the fit keeps seeing
    more than one k at the batch sizes the engine runs, and keeps re-measuring the step
    without speculation that drafting has to beat. An exploration starts only within its
    budget (``explore_budget``, see the module docstring).
    """

    hold = 4
    SHARES = 8  # with cold requests, a k table per share of drafting rows, in eighths
    cold_hold = 4  # steps of an exploration from k = 0 with cold requests (see next_table)
    refit_every = 16
    # None: refit every refit_every steps. A share: also wait until the engine's time since
    # the last fit is that fit's own duration over the share, so that the fit, which runs in
    # the engine's step loop, takes at most that share of it (a fit of a few ms every 16 steps
    # of 5 ms is 3 % of a small model's engine on a 2-core CPU; the controller sets 0.25 %)
    fit_budget: float | None = None
    clock = staticmethod(time.perf_counter)
    # explorations may cost this share of the engine's time at the load's batch size (per
    # doubling, decayed by budget_decay per step there)
    explore_budget = 0.03
    # ... scaled by how near drafting is to paying at the load's batch size (``_near``): the
    # whole budget where the best k > 0 is within ``explore_near[1]`` of k = 0's goodput, an
    # ``explore_least`` share of it at ``explore_near[0]`` and below, linear in between
    explore_near = (0.5, 0.9)
    explore_least = 0.125
    # ... taking for "near", while the table's k at the load's batch size is 0, how near the
    # explorations that drafted came, where lower: seconds per output token of the table's
    # steps at k = 0 over theirs (the step after each included), both measured, per doubling
    # of the load's batch size (the decayed mean of the steps' batch sizes, which the budget
    # is read at), decayed per step of each kind by these. The fit prices whole steps, but
    # from k = 0 with cold requests an exploration runs partly cold steps and warms the rows
    # it admits: on a 2-core CPU at four requests the fit read drafting near paying while
    # explorations and the switches around them took 41 % of the time at batch sizes 2-6
    # (docs/benchmarks.md, s33)
    realised_decay_table = 0.98
    realised_decay_explored = 0.8
    budget_decay = 0.999
    # A step at under half the mean batch size of the last few steps (decayed by this per
    # step: about twenty) is no sample of the fit: the requests missing from it are in the
    # API server's hands (their media decoded, the next ones taken in) on the same CPUs. On a
    # 2-core CPU the k = 0 steps at one request during a load of four took 9-11 ms against
    # 3.5 at a load of one, and the fit read drafting as paying at one request after that
    # load. A load that settles at a smaller batch size is sampled again within twenty steps.
    transient_decay = 0.95
    # The engine's pace: the decayed mean (by this per sample, about five) of the whole
    # decode-only samples' seconds over the last fit's level for their batch size and k, where
    # that level is the median of the batch size's own steps (``_own_level``). Samples are
    # kept divided by the pace when they ran, so that levels measured minutes apart compare as
    # if measured together: where the table's k is 0, a k > 0 is measured only by explorations,
    # and a machine that slows for a while (on a 2-core CPU the k = 0 and k = 4 steps at one
    # request both ran 25 % slower for the first few hundred steps of some servers, and after
    # a load of four) made k = 0, measured in the slow moment, look dear against k > 0 levels
    # measured before it: the table drafted where it lost 10-15 % a token. Faster than the
    # levels' own window (the latest 16 steps), or a slowdown leaks into them as the pace
    # catches up (at 0.95, half of a 30 % one did).
    pace_decay = 0.8
    # a k > 0 is chosen only if it pays with its step costs this many standard errors above
    # the fit (StepTimes.cautious)
    caution = 1.0

    def __init__(self, k_max: int, max_batch: int, explore_every: int = 16,
                 calibration_steps: int = 48, price_admission: bool = False,
                 decay: float = 0.995):
        self.k_max = k_max
        self.max_batch = max_batch
        self.price_admission = price_admission
        self.profile = Acceptance(k_max, max_batch, decay=decay)
        # With draft_cold_requests a request admitted at k = 0 skips the draft's prefill, so
        # drafting also costs that prefill: per output token, the prefill tokens per output
        # token (decayed sums) times what a prompt token costs the draft (its own clock,
        # DraftPassCost; until it has one, what the fit says a prefill token costs more at
        # k > 0, which needs prefill steps that follow a busy engine at both k).
        # And at a batch size new to the load most rows are cold, so a k > 0 guessed there
        # would be measured at a small share only: nothing measured, no drafting.
        self.costs = StepCostModel(k_max, max_batch, split_prefill=price_admission,
                                   guess=not price_admission)
        # the draft's prefill timed by the drafter itself, where it reports its passes
        # (observe_draft); it takes precedence over the step-time fit's difference
        self.draft_cost = DraftPassCost(k_max)
        # decayed sums, plain floats as they change every step: (prefill tokens, output
        # tokens, requests admitted) and (the steps' batch sizes, steps)
        self._tokens = [0.0, 0.0, 0.0]
        self._load = [0.0, 0.0]
        self._load_size = 1  # load_size(), kept by observe: the hook asks for it every step
        self._recent = [0.0, 0.0]  # decayed (batch sizes, steps) by transient_decay
        self._first_runs: set[int] = set()  # the k of the decode-only steps sampled so far
        self._pace = [0.0, 0.0]  # decayed (seconds over the fit's, samples) by pace_decay
        self._expected: dict[tuple, float] = {}  # the last fit's levels as looked up, per fit
        self._decay = decay
        self.admission: np.ndarray | None = None  # [max_batch + 1] seconds per output token
        self.explore_every = explore_every
        self.calibration_steps = calibration_steps
        self.calibration_ks = sorted({0, 1, max(1, k_max // 2), k_max})
        self.table = [k_max] * (max_batch + 1)
        # With cold requests: the share of the next step's decode rows that would draft
        # (``observe``'s ``warm_share``), and a table per share (in steps of 1 / SHARES, the
        # share rounded down): the one for the current share is ``table``
        self.share = 1.0
        self.running: int | None = None  # the requests the last step left running
        self._tables: dict[int, list[int]] = {}
        # what the last fit chose with: (alpha per batch size, cautious step times, admission
        # cost, output tokens per request); None before a fit
        self._choice: tuple | None = None
        # (share in eighths, running requests) -> its table with admitting batch sizes at
        # share 1, until the next fit
        self._composed: dict[tuple[int, int], list[int]] = {}
        self.fitted: StepTimes | None = None
        self._planned_seconds: dict[tuple, float] = {}  # _spend's fitted step times, per fit
        # [max_batch + 1]: the best k > 0's goodput over k = 0's, whole steps, at the last fit
        self._near: np.ndarray | None = None
        # [max_batch + 1, k_max]: the alpha per batch size the last fit chose the tables with
        self.alpha: np.ndarray | None = None
        self.steps = 0
        self.last_k: int | None = None
        # decayed seconds: of every timed step after calibration, and what the explorations'
        # steps (and the switch back after each) took beyond the table's k for their tokens;
        # over every load (reported), and per doubling of the load's batch size [elapsed,
        # overspent, the step they were decayed to] (the budget's; see _budget)
        self.elapsed = 0.0
        self.overspent = 0.0
        self._budgets: dict[int, list] = {}
        self._exploring = True      # this turn of explore_every steps explores
        self._turns = 0             # turns that explored, this one included
        self._decided = -1          # the step the current turn was decided at
        self._explored_last = False
        # per doubling of the load's batch size (its bit length), over the steps where the
        # table's k is 0: decayed [seconds, output tokens, steps] of the table's steps and of
        # the explorations'
        self._realised: dict[int, tuple[list[float], list[float]]] = {}
        self.fit_seconds = 0.0      # the last fit's duration (clock)
        self._since_fit = 0.0       # the engine's seconds since then (observed steps)
        self.fits = 0

    def observe(self, batch: int, k: int, prefill: int, seconds: float | None,
                drafted: list[int], accepted: list[int], emitted: int | None = None,
                share: float = 1.0, elapsed: float | None = None, admitted: int = 0,
                draft_seconds: float = 0.0, warm_share: float | None = None,
                running: int | None = None, positions: list[int] | None = None) -> None:
        """One step: running requests, its k, prefill tokens computed, wall seconds (None:
        not a sample), per request drafts verified and accepted, output tokens emitted (None:
        not counted), the share of its decode rows that drafted (below 1 only with cold
        requests), its wall seconds whether a sample or not (None: as ``seconds``; the
        engine was idle before it if both are None), the requests it admitted, and the
        seconds the drafter's own clock gave its passes in the step, and (cold requests) the
        share of the requests it leaves running that would draft (``WarmRequests``) and
        how many it leaves running, and per request that drafted the output tokens it had
        before the step (None: not known)."""
        # a step at under half the batch size of the last few steps is a dip, no sample
        # (``transient_decay``)
        recent = self._recent[0] / self._recent[1] if self._recent[1] else batch
        if seconds is not None and k == self.last_k and 2 * batch >= recent \
                and self._ran_before(k, prefill):
            pace = self.pace
            self.costs.add(batch, k, seconds / pace, prefill, share)
            t = self._own_level(batch, k) if not prefill and share == 1.0 else None
            if t is not None:
                d = self.pace_decay
                self._pace = [self._pace[0] * d + seconds / t, self._pace[1] * d + 1.0]
        r = self.transient_decay
        self._recent = [self._recent[0] * r + batch, self._recent[1] * r + 1.0]
        wall = seconds if elapsed is None else elapsed
        self._spend(batch, k, wall, emitted, draft_seconds, self._load_size)
        if warm_share is not None:
            self.share, self.running = warm_share, running
        self._since_fit += wall or 0.0
        d = self._decay
        self._tokens = [self._tokens[0] * d + prefill, self._tokens[1] * d + (emitted or 0),
                        self._tokens[2] * d + admitted]
        self._load = [self._load[0] * d + batch, self._load[1] * d + 1.0]
        self._load_size = int(min(max(round(self._load[0] / self._load[1]), 1), self.max_batch))
        self.last_k = k
        if drafted:
            self.profile.update(batch, drafted, accepted, positions)
        self.steps += 1

    @property
    def pace(self) -> float:
        """How much longer the engine's steps take now than the last fit's levels (1 before a
        fit): the fit's levels are in the engine's time divided by this (``pace_decay``)."""
        n = self._pace[1]
        return self._pace[0] / n if n >= 1.0 else 1.0

    def _own_level(self, batch: int, k: int) -> float | None:
        """The last fit's level at (batch, k) where it is the median of that batch size's own
        whole steps (a grid point's), else None: elsewhere a level is the regression's, whose
        error under a load that moves is no pace of the engine's."""
        fitted = self.fitted
        if fitted is None or fitted.own is None:
            return None
        key = (batch, k)
        if key not in self._expected:
            i = int(fitted.index(batch))
            self._expected[key] = float(fitted.times[i, k]) \
                if fitted.grid[i] == batch and fitted.own[i, k] else None
        return self._expected[key]

    def _ran_before(self, k: int, prefill: int) -> bool:
        """Whether a decode-only step at k ran before (a step with prefill counts as one that
        did). The engine's first step at each k pays one-off costs (kernels and buffers for a
        new number of tokens a row) and is no sample: on a 2-core CPU the first k = 1 step at
        one request took 31 ms, the next ones 7, and the first k = 0 one 11.6 ms against
        2.9-4.1; its mean put k = 0 at 4.6 ms in the first fit, which chose k = 4 at one
        request, where it lost 15 % a token."""
        if prefill or k in self._first_runs:
            return True
        self._first_runs.add(k)
        return False

    def _spend(self, batch: int, k: int, seconds: float | None, emitted: int | None,
               draft_seconds: float, load: int) -> None:
        # what the explorations cost: a step off the table, and the one after it (the switch
        # back pays for the switch), against the table's k emitting the same tokens
        if self.steps < self.calibration_steps:
            return
        budget = self._budget(load)
        planned = self.table[min(batch, self.max_batch)]
        explored = k != planned
        # With cold requests and the table at k = 0 a row drafts only if an exploration
        # admitted it: its draft passes in the table's steps (catching up at each filled KV
        # block, on a 2-core CPU a third of a step) are the explorations' too.
        knock_on = draft_seconds if planned == 0 and self.price_admission else 0.0
        if seconds is None:
            # After an idle engine a step has no wall time, yet an exploration there still
            # pays its draft passes: at one request every admission follows an idle engine,
            # and one admitted in an exploration is warm and runs the draft's prefill.
            self._overspend(budget, draft_seconds if explored else knock_on)
            return
        self.elapsed = self.elapsed * self.budget_decay + seconds
        self.overspent *= self.budget_decay
        budget[0] += seconds
        exploring = explored or self._explored_last
        self._explored_last = explored
        if not exploring and knock_on:
            self._overspend(budget, knock_on)
        if planned == 0 and emitted:
            # (keyed by the load's batch size, which the budget is read at: a load of four
            # requests runs steps at 2-6)
            self._realise(load, exploring, seconds, emitted)
        if exploring and self.fitted is not None:
            q = self._shared()
            key = (batch, planned, q)
            t = self._planned_seconds.get(key)
            if t is None:  # the same few keys until the next fit
                t = self._planned_seconds[key] = float(self.fitted.step_time(batch, planned, q))
            t *= self.pace  # the fit's levels are at the pace the samples were kept at
            if emitted is not None and self.alpha is not None:
                # the table's seconds for these tokens, with the alpha it was chosen with
                alpha = self.alpha[min(batch, self.max_batch)]
                e = 1.0 + q * (expected_tokens(alpha, planned) - 1.0)
                t *= emitted / max(batch * e, 1e-9)
            self._overspend(budget, seconds - t)

    def _overspend(self, budget: list, seconds: float) -> None:
        self.overspent += seconds
        # the load's own reading stops at 0: steps that came in under the table's price
        # (noise, mostly: a cold exploration's step is a k = 0 step) bank nothing for the
        # dear ones to spend
        budget[1] = max(budget[1] + seconds, 0.0)

    def _budget(self, load: int) -> list:
        """The budget's [elapsed, overspent] at a load's doubling, decayed by ``budget_decay``
        per step of the engine's since it was last read, whatever the load then (a load met
        again after a long while starts near afresh, not with the debt it left)."""
        budget = self._budgets.get(load.bit_length())
        if budget is None:
            budget = self._budgets[load.bit_length()] = [0.0, 0.0, self.steps]
        elif budget[2] != self.steps:
            d = self.budget_decay ** (self.steps - budget[2])
            budget[0] *= d
            budget[1] *= d
            budget[2] = self.steps
        return budget

    def spent_share(self, load: int) -> float | None:
        """What the explorations cost at a load's doubling, as the budget reads it: a share
        of the engine's time there (None: nothing spent or timed there yet)."""
        budget = self._budgets.get(load.bit_length())  # (a ratio: the decay drops out)
        if not budget or not (budget[0] or budget[1]):
            return None
        return budget[1] / budget[0] if budget[0] else math.inf

    def _realise(self, load: int, explored: bool, seconds: float, emitted: int) -> None:
        pair = self._realised.get(load.bit_length())
        if pair is None:
            pair = self._realised[load.bit_length()] = ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
        d = self.realised_decay_explored if explored else self.realised_decay_table
        sums = pair[explored]
        sums[0] = sums[0] * d + seconds
        sums[1] = sums[1] * d + emitted
        sums[2] = sums[2] * d + 1.0

    def realised_near(self, load: int) -> float | None:
        """At a load of about ``load`` requests (its doubling), over the steps where the
        table's k is 0: the explorations' output tokens per second over the table's steps',
        both measured (None: not yet an exploration's two steps, decayed, and as many of the
        table's)."""
        pair = self._realised.get(load.bit_length())
        if pair is None:
            return None
        (t_s, t_n, t_w), (e_s, e_n, e_w) = pair
        if min(t_w, e_w) < 1.75 or not (t_s and e_s and t_n):  # two steps each, decayed
            return None
        return (e_n / e_s) / (t_n / t_s)

    def observe_draft(self, passes) -> None:
        """The drafter's timed passes since the last step: (k, rows, prompt tokens, other
        first-pass tokens, seconds) each."""
        for sample in passes:
            self.draft_cost.add(*sample)

    def next_table(self) -> list[int]:
        """The k per batch size to use for the next step."""
        if self.steps < self.calibration_steps:
            k = self.calibration_ks[(self.steps // self.hold) % len(self.calibration_ks)]
            return [k] * (self.max_batch + 1)
        # refit and choose every refit_every steps (within the fit's budget): this runs in
        # the engine's step loop. Until a fit succeeds (two k measured at some batch size: at
        # one request steps after an idle engine are no samples) it is tried at every step,
        # within the budget too
        if (self.fitted is None or self.steps % self.refit_every == 0) and self._fit_due():
            started = self.clock()
            self.fitted = self.costs.fit() or self.fitted
            self._planned_seconds, self._expected = {}, {}
            if self.fitted is not None:
                self.admission = self._admission_cost(self.fitted)
                cautious = self.fitted.cautious(self.caution)
                self.alpha = alpha = self.profile.per_batch(np.arange(self.max_batch + 1),
                                                            self.tokens_per_request)
                self._choice = (alpha, cautious, self.admission, self.tokens_per_request)
                self._tables, self._composed = {}, {}
                g = goodput_table(alpha, self.fitted, self.max_batch, self.k_max,
                                  self.admission, self.tokens_per_request)
                self._near = g[:, 1:].max(axis=1) / np.maximum(g[:, 0], 1e-12)
            self.fit_seconds, self._since_fit = self.clock() - started, 0.0
            self.fits += 1
        if self._choice is not None:
            q = round(self._shared() * self.SHARES)
            self.table = self._table_at(q)
            if q < self.SHARES and self.running is not None:
                # a batch size above the running requests' admits some: whether they draft
                # is decided by that step's k (drafter/cold.py), so there it is the k that
                # pays once every row drafts, if whole steps draft at the load's batch size
                # too (see the module docstring); below, the k that pays at the running share
                load = self.load_size()
                key = (q, self.running, load)
                if key not in self._composed:
                    top, whole = self.running + 1, self._table_at(self.SHARES)
                    admit = whole[top:] if whole[load] else [0] * len(whole[top:])
                    self._composed[key] = self.table[:top] + admit
                self.table = self._composed[key]
        phase = self.steps % self.explore_every
        if phase == 0 and self._decided != self.steps:  # a turn explores within the budget
            self._decided = self.steps
            spent = self.spent_share(self._load_size)
            self._exploring = spent is None or spent <= self.explore_share()
            self._turns += self._exploring
        cold = self.price_admission
        if phase >= (self.cold_hold if cold else 2) or not self._exploring:
            return self.table
        turn = (self._turns - 1) % 3
        # with cold requests a batch size at k = 0 explores on every turn, for ``cold_hold``
        # steps: only its rows admitted in such steps draft (drafter/cold.py). It tries 1, k/2
        # and k in turn: a drafting step's fixed part can make k = 1 lose where a longer draft
        # pays, and above the largest k measured nothing is chosen (StepTimes.allowed)
        up = self.calibration_ks[1 + turn % (len(self.calibration_ks) - 1)]
        if phase >= 2:
            return [up if k == 0 else k for k in self.table]
        if turn == 2:  # no speculation, the baseline every choice is weighed against
            return [up if k == 0 and cold else 0 for k in self.table]
        nudge = 1 if turn == 0 else -1
        return [up if k == 0 and cold else min(self.k_max, max(0, k + nudge))
                for k in self.table]

    def _table_at(self, q: int) -> list[int]:
        """The last fit's table at a share of q / SHARES drafting rows, chosen when first asked
        for (a load passes through a few shares between fits); its time counts as the fit's."""
        table = self._tables.get(q)
        if table is None:
            started = self.clock()
            alpha, cautious, admission, length = self._choice
            table = self._tables[q] = choose_k(alpha, cautious, self.max_batch, self.k_max,
                                               admission, length, q / self.SHARES)
            self.fit_seconds += self.clock() - started
        return table

    def _shared(self) -> float:
        """The share the table is chosen at: ``share`` rounded down to a step of 1 / SHARES
        (1 without cold requests)."""
        if not self.price_admission:
            return 1.0
        return math.floor(self.share * self.SHARES + 1e-9) / self.SHARES

    def explore_share(self) -> float:
        """The explorations' share of the engine's time now: ``explore_budget``, less where
        drafting is far from paying at the load's batch size. Explorations are how a change
        that makes drafting pay is found; the farther the best k > 0 is from paying, the
        less likely such a change is, and the less finding it late costs. On a 2-core CPU
        a k = 4 step at one request emits a token for 1.5 times a k = 0 one's cost."""
        if self._near is None:
            return self.explore_budget
        lo, hi = self.explore_near
        load = self.load_size()
        near = float(self._near[load])
        # only while the table's k there is 0: where it drafts, the explorations also re-measure
        # k = 0, which must stay as frequent as the fit says (a stale reading from k = 0 would
        # keep a table that drafts where it does not pay)
        realised = self.realised_near(load) if self.table[load] == 0 else None
        if realised is not None:
            near = min(near, realised)
        return self.explore_budget * min(max((near - lo) / (hi - lo), self.explore_least), 1.0)

    def load_size(self) -> int:
        """The load's batch size: the decayed mean of the steps' batch sizes (1 before a
        step)."""
        return self._load_size

    def _fit_due(self) -> bool:
        return self.fit_budget is None or self._since_fit * self.fit_budget >= self.fit_seconds

    @property
    def tokens_per_request(self) -> float | None:
        """Output tokens per admitted request (decayed sums), None before one was counted."""
        emitted, admitted = self._tokens[1:]
        return float(emitted / admitted) if admitted >= 1.0 and emitted > 0 else None

    def _admission_cost(self, fitted: StepTimes) -> np.ndarray | None:
        if fitted.draft_prefill is None or self._tokens[1] <= 0:  # not priced, or no output yet
            return None
        price = self.draft_cost.price()  # the drafter's clock: the engine's time, now
        per_prefill = fitted.draft_prefill[fitted.index(np.arange(self.max_batch + 1))] \
            if price is None else np.full(self.max_batch + 1, price / self.pace)
        return per_prefill * self._tokens[0] / self._tokens[1]
