"""What auto_k costs per engine step: ``AutoK.observe`` and ``next_table`` (the fit and the
choice every ``refit_every`` steps), which run in the scheduler's step loop.

    python -m lvspec_vllm.bench.auto_k_cost [--max-batch 64] [--steps 2000] [--fit-budget 0.01]
        [--hook]

Fills the controller with mixed steps over batch sizes 1-64 (every 9th with a prefill), then
times steps at one batch size each (each step reported to take 5 ms + 1 ms per drafted token,
a small model's step on a 2-core CPU) and prints microseconds per step, with the fit every
``refit_every`` steps and, with ``--fit-budget``, within that share of the reported step time
(``AutoK.fit_budget``, what the engine's controller sets).

With ``--hook``: the scheduler's whole hook instead (``patches/scheduler.py``: the patch's
wrapper around a stand-in for vLLM's update, ``AutoKController.after_step`` and the controller
with cold requests and the engine's fit budget), on the scheduler outputs of a simulated engine
that keeps ``batch`` requests of 128 output tokens running, each replaced when it finishes. Two
engines: one where drafting cannot pay (a drafting step costs twice a plain one; alpha 0.5),
so the table settles on k = 0, the common case under load, and one where it pays (a draft
token costs 5 % of a plain step; alpha 0.9). The step times are the simulation's (the
hook's clock is replaced), the microseconds printed are the hook's own.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from types import SimpleNamespace

from lvspec_vllm.auto_k import AutoK


def per_step_us(max_batch: int, steps: int, batch: int, seed: int = 0,
                fit_budget: float | None = None) -> float:
    auto = AutoK(4, max_batch, price_admission=True)
    auto.fit_budget = fit_budget
    rng = random.Random(seed)
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch]
    for i in range(3000):  # calibrated, every grid point's buckets filled
        b = rng.choice(sizes)
        k = auto.next_table()[b]
        auto.observe(b, k, 100 if i % 9 == 0 else 0, 0.005 + 0.001 * k,
                     [k] * b if k else [], [1] * b if k else [], b,
                     positions=[rng.randrange(256) for _ in range(b)] if k else None)
    # each request's output tokens before the step, as the scheduler's hook reads them
    at = [rng.randrange(256) for _ in range(batch)]
    t0 = time.perf_counter()
    for _ in range(steps):
        k = auto.next_table()[batch]
        auto.observe(batch, k, 0, 0.005 + 0.001 * k, [k] * batch if k else [],
                     [1] * batch if k else [], batch, positions=at if k else None)
    return (time.perf_counter() - t0) / steps * 1e6


# (seconds a drafting step costs over a plain one, per draft token over a plain one, alpha)
HOOK_ENGINES = {"drafting cannot pay": (1.0, 0.0, 0.5), "drafting pays": (0.0, 0.05, 0.9)}


def hook_us_per_step(batch: int, steps: int, engine: str, seed: int = 0,
                     warmup: int = 2000, output: int = 128) -> tuple[float, Counter, int]:
    """The hook's microseconds per step over ``steps`` steps after ``warmup``, the k of the
    timed steps (explorations included), and the table's k at ``batch`` at the end."""
    from lvspec_vllm.patches import scheduler as hook

    fixed, per_token, alpha = HOOK_ENGINES[engine]
    rng = random.Random(seed)
    clock = [0.0]  # the simulation's seconds: the controller's clock, not the bench's
    real = hook.time
    hook.time = SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic)
    try:
        live: dict[str, SimpleNamespace] = {}
        sched = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=batch),
                                dynamic_sd_lookup=[0] * (batch + 1), requests=live,
                                get_num_unfinished_requests=lambda: len(live))
        ctl = hook.AutoKController(sched, 4, price_admission=True)
        sched.__dict__.update(_lvspec_auto_k=ctl, _lvspec=True)
        warm: set[str] = set()
        drafts: dict[str, list[int]] = {}  # the drafts each warm request holds for the step
        serial, timed, ks = 0, 0.0, Counter()

        def update(self, out, result):  # vLLM's: append the tokens, free finished requests
            for r, tokens in zip(out.num_scheduled_tokens, result.sampled_token_ids):
                live[r].num_output_tokens += len(tokens)
                if live[r].num_output_tokens >= output:
                    del live[r]
                    warm.discard(r)
                    drafts.pop(r, None)

        for step in range(warmup + steps):
            k = sched.dynamic_sd_lookup[batch]
            new = []
            while len(live) < batch:
                r = f"r{serial}"
                serial += 1
                live[r] = SimpleNamespace(num_output_tokens=0)
                new.append(r)
                if k:
                    warm.add(r)
            spec = {r: d for r, d in drafts.items() if d}
            rows = {r: 100 if r in new else 1 + len(spec.get(r, ())) for r in live}
            sampled = []
            for r in rows:
                accepted = 0
                while accepted < len(spec.get(r, ())) and rng.random() < alpha:
                    accepted += 1
                sampled.append([1] * (1 + accepted))
            out = SimpleNamespace(
                num_scheduled_tokens=rows, total_num_scheduled_tokens=sum(rows.values()),
                num_spec_tokens_to_schedule=k,
                scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
                scheduled_spec_decode_tokens=spec)
            result = SimpleNamespace(req_id_to_index={r: i for i, r in enumerate(rows)},
                                     sampled_token_ids=sampled)
            drafting = sum(r in warm for r in rows) if k else 0
            plain = 0.004 + 0.0001 * batch
            clock[0] += plain * (1 + (fixed if drafting else 0.0) + per_token * k * drafting
                                 / batch) * rng.uniform(0.97, 1.03)
            t0 = time.perf_counter()
            hook.SchedulerUpdatePatch.wrapper(update, sched, out, result)
            if step >= warmup:
                timed += time.perf_counter() - t0
                ks[k] += 1
            drafts = {r: [7] * k for r in live if r in warm and k}
        return timed / steps * 1e6, ks, ctl.auto.table[batch]
    finally:
        hook.time = real


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--fit-budget", type=float, default=None)
    ap.add_argument("--hook", action="store_true",
                    help="time the scheduler's whole hook on a simulated engine")
    args = ap.parse_args(argv)
    if args.hook:
        for engine in HOOK_ENGINES:
            for batch in (1, 16, 64):
                if batch <= args.max_batch:
                    us, ks, table = hook_us_per_step(batch, args.steps, engine)
                    print(f"{engine}, batch {batch}: {us:.0f} us per step (the table's k "
                          f"{table}; steps by k {dict(sorted(ks.items()))})", flush=True)
        return
    for batch in (1, 16, 64):
        if batch <= args.max_batch:
            us = per_step_us(args.max_batch, args.steps, batch)
            line = f"batch {batch}: {us:.0f} us per step"
            if args.fit_budget is not None:
                us = per_step_us(args.max_batch, args.steps, batch, fit_budget=args.fit_budget)
                line += f", {us:.0f} with the fit within {args.fit_budget:.0%} of the steps"
            print(line, flush=True)


if __name__ == "__main__":
    main()
