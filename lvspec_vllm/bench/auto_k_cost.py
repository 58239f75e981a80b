"""What auto_k costs per engine step: ``AutoK.observe`` and ``next_table`` (the fit and the
choice every ``refit_every`` steps), which run in the scheduler's step loop.

    python -m lvspec_vllm.bench.auto_k_cost [--max-batch 64] [--steps 2000] [--fit-budget 0.01]

Fills the controller with mixed steps over batch sizes 1-64 (every 9th with a prefill), then
times steps at one batch size each (each step reported to take 5 ms + 1 ms per drafted token,
a small model's step on a 2-core CPU) and prints microseconds per step, with the fit every
``refit_every`` steps and, with ``--fit-budget``, within that share of the reported step time
(``AutoK.fit_budget``, what the engine's controller sets).
"""

from __future__ import annotations

import argparse
import random
import time

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--fit-budget", type=float, default=None)
    args = ap.parse_args(argv)
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
