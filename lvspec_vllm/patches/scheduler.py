"""Patch: ``vllm.v1.core.sched.scheduler.Scheduler.update_from_output`` (vLLM 0.32, 0.33).

Why: with ``"auto_k": true`` LVSpec picks k per step (``lvspec_vllm.auto_k``). vLLM already
has the mechanism for a per-step k: with ``num_speculative_tokens_per_batch_size`` set, the
scheduler reads k from ``Scheduler.dynamic_sd_lookup[batch size]`` at every ``schedule()``, and
the runner, the drafter and async scheduling all follow it. What vLLM lacks is a policy that
learns; this post-hook is where every step's outcome arrives (scheduled drafts, sampled tokens),
so it measures the step, feeds the controller, and rewrites the lookup table for the next
step. Nothing else in the scheduler changes; without ``auto_k`` the hook only notes the step's k
for ``engine_core.py`` (LVSpec engines), and returns.

The chosen k per step is counted on ``/metrics`` (``lvspec:auto_k_steps_total{k}``) and the
model's inputs (alpha, the fitted step times at the current batch size, the draft's price of a
prompt token) are logged every 10 s. With cold requests the drafter's timed passes arrive on
the step's output (``runner_output.py``) and are fed to the controller here too.
With cold requests a step at k > 0 whose decode rows are partly cold is a sample of the share
that drafted, and the hook tells the controller which running requests would draft at all
(``auto_k.WarmRequests``): the next step's k is chosen at their share.
With ``LVSPEC_AUTO_K_TRACE=<file>`` every step the controller sees is appended to that file as
one JSON line ``[batch, k, prefill tokens, seconds, previous step's k, share, wall seconds,
the table's k, warm share, output tokens]`` (seconds: None where the step is no sample; wall
seconds: None after an idle engine; the table's k: what ``auto_k`` chose for the batch size,
which an exploration's k differs from; warm share: the share of the requests the step leaves
running that would draft, None without cold requests; output tokens: what the step emitted).
``python -m lvspec_vllm.bench.auto_k_trace <file>`` summarises it.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

from lvspec_vllm import metrics
from lvspec_vllm._blas import numpy_blas_single_threaded
from lvspec_vllm._logging import get_logger
from lvspec_vllm.auto_k import AutoK, WarmRequests, decode_share
from lvspec_vllm.config import LVSpecConfig
from lvspec_vllm.patches import Patch
from lvspec_vllm.patches.runner_output import draft_passes

logger = get_logger(__name__)
_LOG_INTERVAL_S = 10.0
TRACE_ENV = "LVSPEC_AUTO_K_TRACE"
# the share of the engine's time auto_k's fit may take (AutoK.fit_budget). A fit runs inside the
# step loop, 4-16 ms on a 2-core CPU (the log line's "the last ... ms" in serving sweeps); from
# 1 % to this budget (with tables chosen per share when first used) the hook's time on a
# step at k = 0 about halved (``python -m lvspec_vllm.bench.auto_k_cost --hook``), and a fit
# every few hundred steps still sees every exploration's samples
FIT_BUDGET = 0.0025
# this process's schedulers that run an auto_k controller, for the benchmark that switches it in
# a running server (``lvspec_vllm.bench.hook_switch``); weak, so that an engine shut down in
# the process is freed
_AUTO_K_SCHEDULERS: weakref.WeakSet = weakref.WeakSet()


class AutoKController:
    """Glue between the scheduler and ``AutoK``: measure each step, set the k table."""

    def __init__(self, scheduler, k_max: int, price_admission: bool = False):
        self.max_batch = scheduler.scheduler_config.max_num_seqs
        self.auto = AutoK(k_max, self.max_batch, price_admission=price_admission)
        self.auto.fit_budget = FIT_BUDGET
        self.cold = price_admission  # draft_cold_requests: some decode rows never draft
        self.warm = WarmRequests() if price_admission else None
        self.last_end: float | None = None
        self.own_seconds = self.engine_seconds = 0.0  # after_step's, and the timed steps'
        self.steps_by_k: Counter = Counter()
        self.last_k = k_max
        self._priced = False
        self._applied: list[int] | None = None  # the table last written to vLLM's lookup
        self._last_log = self._last_publish = time.perf_counter()
        self._next_report = self._last_log  # when _report has something to do (after_step)
        directory = os.environ.get(metrics.ENV)
        self._path = Path(directory) / f"core-{os.getpid()}.json" if directory else None
        trace = os.environ.get(TRACE_ENV)
        self._trace = open(trace, "a", buffering=1) if trace else None  # a line per step
        if self._trace is not None:
            atexit.register(self._trace.close)
        self._apply(scheduler, self.auto.next_table())
        # the controller's numpy must not take the model's cores (_blas.py)
        limited = numpy_blas_single_threaded()
        logger.info("LVSpec auto k: choosing k in [0, %d] per step for batch sizes up to %d "
                    "(numpy's BLAS held to one thread: %s)", k_max, self.max_batch,
                    ", ".join(limited) or "none found")

    @staticmethod
    def positions(scheduler, scheduler_output) -> dict[str, int]:
        """Per request with drafts to verify, its output tokens before the step: read before
        vLLM's update, which appends the step's tokens and drops the requests that finish."""
        live = scheduler.requests
        return {r: live[r].num_output_tokens
                for r in (scheduler_output.scheduled_spec_decode_tokens or ()) if r in live}

    def after_step(self, scheduler, scheduler_output, model_runner_output,
                   positions: dict[str, int] | None = None) -> None:
        """``positions``: ``positions(scheduler, scheduler_output)`` from before the update."""
        now = time.perf_counter()
        batch = len(scheduler_output.num_scheduled_tokens)
        if batch == 0:
            self.last_end = None
            return
        k = scheduler_output.num_spec_tokens_to_schedule
        # The wall time since the previous step's outcome is this step's cost, as long as the
        # engine had work in between (otherwise it includes idle time: not a sample).
        elapsed = now - self.last_end if self.last_end is not None else None
        drafted, accepted, at = [], [], []
        positions = positions or {}
        index = model_runner_output.req_id_to_index
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        for req_id, drafts in spec.items():
            i = index.get(req_id)
            if i is None or not drafts or i >= len(model_runner_output.sampled_token_ids):
                continue
            drafted.append(len(drafts))
            accepted.append(max(len(model_runner_output.sampled_token_ids[i]) - 1, 0))
            at.append(positions.get(req_id, 0))
        # a decode row is its input token plus its drafts; everything else is prefill
        scheduled = scheduler_output.num_scheduled_tokens
        if spec or k:
            decode = {req_id: len(spec.get(req_id, ())) for req_id, n in scheduled.items()
                      if n == 1 + len(spec.get(req_id, ()))}
            decode_rows = list(decode.values())
        else:  # most steps under load: counted without a Python loop (the hook is per step)
            decode, decode_rows = {}, [0] * list(scheduled.values()).count(1)
        warm_share = None
        if self.warm is not None:
            # the next step's rows: this step's, less those that finished (vLLM has already
            # dropped them from ``scheduler.requests``)
            live = getattr(scheduler, "requests", None)
            ids = scheduled.keys()
            # (a set of this step's ids, less the live ones: over the step's ids, not the
            # scheduler's every request)
            finished = () if live is None else set(ids).difference(live)
            running = [r for r in ids if r not in finished] if finished else ids
            warm_share = self.warm.step(
                k, self.last_k, [r.req_id for r in scheduler_output.scheduled_new_reqs],
                decode, running, finished)
            if live is not None and self.auto.steps % 1024 == 0:
                self.warm.forget(live)
        prefill = scheduler_output.total_num_scheduled_tokens - sum(decode_rows) \
            - len(decode_rows)
        # the share of the decode rows that drafted (cold requests do not); None: no sample
        share = decode_share(k, self.last_k, decode_rows, self.cold)
        seconds = None if share is None else elapsed
        emitted = sum(map(len, model_runner_output.sampled_token_ids))
        if self._trace is not None:
            planned = self.auto.table[min(batch, self.max_batch)]
            self._trace.write(json.dumps([batch, k, prefill, seconds, self.auto.last_k,
                                          share, elapsed, planned, warm_share,
                                          emitted]) + "\n")
        passes = draft_passes(model_runner_output)
        self.auto.observe_draft(passes)
        self.auto.observe(batch, k, prefill, seconds, drafted, accepted, emitted,
                          1.0 if share is None else share, elapsed=elapsed,
                          admitted=len(scheduler_output.scheduled_new_reqs),
                          draft_seconds=sum(p[-1] for p in passes), warm_share=warm_share,
                          running=None if warm_share is None else len(running),
                          positions=at)
        # publish at once what a short run must show: a k chosen for the first time, the
        # draft's prefill priced for the first time
        ready = self.auto.draft_cost.ready
        publish = k not in self.steps_by_k or (ready and not self._priced)
        self._priced = ready
        self.steps_by_k[k] += 1
        self.last_k = k
        self._apply(scheduler, self.auto.next_table())
        end = time.perf_counter()
        self.last_end = end if scheduler.get_num_unfinished_requests() else None
        # the controller's own time (its fits included) against the engine's: its overhead
        self.own_seconds += end - now
        self.engine_seconds += elapsed or 0.0
        if publish or end >= self._next_report:  # (the hook's clock, read once a step)
            self._report(batch, publish=publish)

    def _apply(self, scheduler, table: list[int]) -> None:
        # AutoK hands back the same list until a fit, a share or an exploration changes it:
        # the lookup (max_num_seqs + 1 entries) is rewritten only then
        if table is self._applied:
            return
        lookup = scheduler.dynamic_sd_lookup
        n = min(len(lookup), len(table))
        lookup[1:n] = table[1:n]
        self._applied = table

    def _report(self, batch: int, publish: bool) -> None:
        now = time.perf_counter()
        publish = self._path is not None and (
            publish or now - self._last_publish >= metrics.PUBLISH_INTERVAL_S)
        log = now - self._last_log >= _LOG_INTERVAL_S
        self._next_report = min(
            (now if log else self._last_log) + _LOG_INTERVAL_S,
            (now if publish else self._last_publish) + metrics.PUBLISH_INTERVAL_S
            if self._path is not None else math.inf)
        if not (publish or log):
            return
        price = self.auto.draft_cost.price()  # a small solve: once, and only when reported
        if publish:
            self._last_publish = now
            snap = {f"auto_k_steps_{k}": n for k, n in self.steps_by_k.items()}
            snap["auto_k_last"] = self.last_k
            snap["auto_k_elapsed_seconds"] = self.auto.elapsed
            snap["auto_k_overspent_seconds"] = self.auto.overspent
            if self.warm is not None and self.auto.running is not None:
                # counts, not the share: the collector sums every engine core's files
                snap["auto_k_running"] = self.auto.running
                snap["auto_k_warm"] = round(self.auto.share * self.auto.running)
            if self.auto.draft_cost.count:
                snap["auto_k_draft_passes"] = self.auto.draft_cost.count
                snap["auto_k_draft_prompt_token_seconds"] = price or 0.0
            tmp = self._path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(snap))
                tmp.replace(self._path)
            except OSError:
                self._path = None
        if log:
            self._last_log = now
            fitted = self.auto.fitted
            pace = self.auto.pace
            costs = "uncalibrated" if fitted is None else [
                round(float(t) * pace * 1e3, 2)
                for t in fitted.step_time(batch, np.arange(self.auto.k_max + 1))]
            measured = "n/a" if fitted is None or fitted.measured is None else \
                np.flatnonzero(fitted.measured[fitted.index(batch)]).tolist()
            spread = "n/a" if fitted is None or fitted.spread is None else [
                round(float(t) * 1e3, 2) for t in fitted.spread[fitted.index(batch)]]
            admission, per_request = self.auto.admission, self.auto.tokens_per_request
            logger.info(
                "LVSpec auto k: batch %d -> k %d (rows that would draft %.2f); alpha at this "
                "batch over an output, at the last fit %s; step ms by k at this batch, all "
                "rows drafting %s at the engine's pace now, %.2f of the fit's (standard "
                "errors %s; measured near it: k %s); output tokens "
                "per request %s; draft prefill per output token when drafting, ms %s "
                "(drafter's clock: us per prompt token %s, %d passes); explorations' cost "
                "%.1f %% of the time, at the load's batch size %d %s (budget %.1f %%, where the "
                "explorations that drafted while k was 0 ran at %s of its tokens/s); %d fits, "
                "the last %.2f ms; the controller's own time %.2f %% of the engine's; k by "
                "batch size %s; steps by k %s",
                batch, self.last_k, self.auto.share,
                "n/a" if self.auto.alpha is None else
                [round(float(a), 2) for a in self.auto.alpha[min(batch, self.max_batch)]],
                costs, pace, spread, measured,
                "n/a" if per_request is None else round(per_request, 1),
                "n/a" if admission is None else round(float(admission[batch]) * 1e3, 3),
                "n/a" if price is None else round(price * 1e6, 2), self.auto.draft_cost.count,
                100 * self.auto.overspent / max(self.auto.elapsed, 1e-9),
                (load := self.auto.load_size()),
                "n/a" if (spent := self.auto.spent_share(load)) is None else
                f"{100 * spent:.1f} %", 100 * self.auto.explore_share(),
                "n/a (the table drafts at this load)" if self.auto.table[load] else
                "n/a" if (near := self.auto.realised_near(load)) is None else f"{near:.2f}x",
                self.auto.fits, self.auto.fit_seconds * 1e3,
                100 * self.own_seconds / max(self.engine_seconds, 1e-9),
                self.auto.table[1:65], dict(self.steps_by_k))


def _controller(scheduler) -> AutoKController | None:
    ctl = scheduler.__dict__.get("_lvspec_auto_k", False)
    if ctl is False:
        ctl = None
        additional = scheduler.vllm_config.additional_config
        options = additional.get("lvspec") if isinstance(additional, dict) else None
        config = LVSpecConfig.from_dict(options) if options is not None else None
        if config is not None and config.auto_k and scheduler.dynamic_sd_lookup is not None:
            ctl = AutoKController(scheduler, scheduler.num_spec_tokens,
                                  price_admission=config.draft_cold_requests)
            _AUTO_K_SCHEDULERS.add(scheduler)
        scheduler.__dict__["_lvspec_auto_k"] = ctl
        scheduler.__dict__["_lvspec"] = config is not None
    return ctl


def auto_k_schedulers() -> list:
    """The schedulers of this process that run an auto_k controller."""
    return list(_AUTO_K_SCHEDULERS)


def last_step_k(scheduler) -> int | None:
    """k of the step whose outcome the scheduler took last, for an LVSpec engine (else None)."""
    return scheduler.__dict__.get("_lvspec_last_k")


class SchedulerUpdatePatch(Patch):
    target_module = "vllm.v1.core.sched.scheduler"
    target_owner = "Scheduler"
    target_attr = "update_from_output"

    @staticmethod
    def wrapper(original, self, scheduler_output, model_runner_output):
        ctl = _controller(self)
        positions = None if ctl is None else ctl.positions(self, scheduler_output)
        out = original(self, scheduler_output, model_runner_output)
        if self.__dict__["_lvspec"]:  # read by the engine core's post_step (engine_core.py)
            self.__dict__["_lvspec_last_k"] = scheduler_output.num_spec_tokens_to_schedule
        if ctl is not None:
            ctl.after_step(self, scheduler_output, model_runner_output, positions)
        return out
