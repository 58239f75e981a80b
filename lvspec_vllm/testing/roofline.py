"""A GPU-shaped engine for ``auto_k`` under a load ramp: does k follow the batch size?

    python -m lvspec_vllm.testing.roofline [--alpha 0.5 0.8 0.95] [--seeds 0-11]

The target's forward is flat in its rows until it turns compute-bound (the larger of a memory
time and rows x a time per row); each of k draft forwards costs c + d B. The load ramps
1 -> 256 -> 1 running requests (``LEVELS``, 300 steps a level, the batch size within 30 % of
the level); the controller sees only step times and accepted counts, as vLLM shows them.
Used by ``tests/test_auto_k.py``; run as a module it prints, per alpha and seed, the goodput
of the k chosen at the end at each level against the best k's there, the worst of them, and
the turns of ``explore_every`` steps that explored.
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from lvspec_vllm.auto_k import AutoK, goodput_table

LEVELS = (1, 4, 16, 64, 256, 64, 16, 4, 1)


class Roofline:
    """Step seconds: max(memory, rows x row) for the target, k (c + d B) for the draft."""

    def __init__(self, memory=0.02, row=1e-4, c=3e-3, d=1e-5):
        self.memory, self.row, self.c, self.d = memory, row, c, d

    def step_time(self, batch, k):
        batch = np.asarray(batch, dtype=float)
        return np.maximum(self.memory, batch * (k + 1) * self.row) + k * (self.c + self.d * batch)


def engine_step(auto: AutoK, true, batch: int, alpha: float, rng: random.Random,
                timed=lambda batch, k: True) -> tuple[int, float]:
    """One step of a simulated engine at ``batch`` requests, drafts accepted with probability
    alpha each, its time from ``true`` within 2 % (a sample where ``timed``); the controller
    sees what vLLM would show. Returns the k and the seconds."""
    k = auto.next_table()[batch]
    accepted = []
    for _ in range(batch):
        m = 0
        while m < k and rng.random() < alpha:
            m += 1
        accepted.append(m)
    t = float(true.step_time(batch, k)) * rng.uniform(0.98, 1.02)
    auto.observe(batch, k, 0, t if timed(batch, k) else None, [k] * batch if k else [],
                 accepted)
    return k, t


def ramp(alpha: float, seed: int = 3, auto: AutoK | None = None, steps: int = 300):
    """``LEVELS`` on a ``Roofline``: (the controller, the engine's seconds, per level of 1, 4,
    16, 64 and 256 requests the goodput of the k its table ends with over the best k's, the
    (batch, k, seconds) of every step)."""
    true, rng = Roofline(), random.Random(seed)
    auto = AutoK(k_max=8, max_batch=256) if auto is None else auto
    engine, samples = 0.0, []
    for level in LEVELS:
        for _ in range(steps):
            batch = max(1, min(256, int(level * rng.uniform(0.7, 1.3))))
            k, t = engine_step(auto, true, batch, alpha, rng)
            engine += t
            samples.append((batch, k, t))
    goodput = goodput_table([alpha] * auto.k_max, true, 256, auto.k_max)
    ratios = [float(goodput[b, auto.table[b]] / goodput[b].max()) for b in sorted(set(LEVELS))]
    return auto, engine, ratios, samples


def seed_range(text: str) -> list[int]:
    """``LO-HI`` (or one seed) as the seeds it names: the ``--seeds`` of the testing CLIs."""
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    ap.add_argument("--seeds", type=seed_range, default=seed_range("3"), help="one or LO-HI")
    args = ap.parse_args(argv)
    for alpha in args.alpha:
        worst = []
        for seed in args.seeds:
            auto, _, ratios, _ = ramp(alpha, seed)
            worst.append(min(ratios))
            print(f"alpha {alpha} seed {seed}: goodput / best at 1, 4, 16, 64, 256 requests "
                  + " ".join(f"{r:.3f}" for r in ratios)
                  + f"; {auto._turns} turns explored")
        print(f"alpha {alpha}: the worst level {min(worst):.3f}-{max(worst):.3f} of the best "
              f"over {len(worst)} seeds")


if __name__ == "__main__":
    main()
