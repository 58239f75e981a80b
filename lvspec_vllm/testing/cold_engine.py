"""A simulated engine for ``auto_k`` with cold requests: can a passing k = 0 be left?

    python -m lvspec_vllm.testing.cold_engine [--steps 4000] [--alpha 0.8] [--draft-fixed S]
        [--slow-until 200] [--plain-slow-until 0] [--seed 9 | --seeds LO-HI [--last 1000]]

``concurrency`` requests of ``output`` tokens, each replaced when it finishes, on an engine
where drafting pays (k = 4 doubles goodput at alpha 0.8), except for a slow moment during
calibration: for the first ``slow_until`` steps a step in which the draft runs takes 3x (and
for the first ``plain_slow_until`` steps one in which it does not takes 2x). The
requests are cold as the drafter keeps them (``drafter/cold.py``: admitted at k = 0, a request
never drafts). A step costs the target's verify of every row it checks plus k
draft passes over the warm rows, and ``draft_fixed`` seconds once if any row drafts (the
fixed part of a drafting step: on the 2-core CPU about a k = 0 step's own time, which
``--draft-fixed 0.01`` mimics); the controller sees what the scheduler's hook shows it
(``auto_k.decode_share``). Used by ``tests/test_auto_k.py``; run as a module it prints the
mean k, the k chosen, the samples at k > 0 (their share of drafting rows) and the output
tokens per simulated second (also against an engine that never drafts) per window of steps;
with ``--seeds`` instead, per seed the output tokens per second of the last ``--last`` steps
against never drafting and the k chosen at the end, then their mean and spread (one seed's
figure moves by up to 1 % with any change to the controller's path).
"""

from __future__ import annotations

import argparse
import random
import statistics

from lvspec_vllm.auto_k import AutoK, WarmRequests, decode_share
from lvspec_vllm.drafter.cold import ColdRequests
from lvspec_vllm.drafter.lag import Row
from lvspec_vllm.testing.roofline import seed_range


def run(auto: AutoK, steps: int = 4000, concurrency: int = 4,
        output: int = 40, alpha: float = 0.8, slow_until: int = 200,
        seed: int = 9, draft_fixed: float = 0.0, gap: int = 0,
        late_alpha: float | None = None, early: int = 8,
        positions: bool = True, plain_slow_until: int = 0,
        plain_slow: float = 2.0) -> list[tuple[int, float | None, int, float, int]]:
    """Per step: (k, share of decode rows that drafted or None if no sample, the k chosen for
    ``concurrency`` requests, its seconds, output tokens emitted). ``gap``: a finished
    request's successor arrives after 0 to ``gap`` steps (the batch size moves under
    ``concurrency``, as a serving client's round trips make it). ``late_alpha``: drafts made
    at ``early`` output tokens or more are accepted at this instead (None: at ``alpha``);
    ``positions``: the controller is told where in its output each drafting row was.
    ``plain_slow_until``: before this step a step in which no row drafts takes ``plain_slow``
    times as long (the k = 0 steps measured in a slow moment that drafting ones missed)."""
    rng = random.Random(seed)
    arrivals: list[int] = []  # the steps at which the next requests arrive
    cold = ColdRequests(block_size=16)
    warm_requests = WarmRequests()
    live: dict[str, list] = {}  # id -> [tokens left, drafts held (None: prefill this step)]
    serial, previous, seen = 0, None, []
    for step in range(steps):
        while len(live) + len(arrivals) < concurrency:
            arrivals.append(step + rng.randint(0, gap))
        for due in [a for a in arrivals if a <= step]:
            arrivals.remove(due)
            live[f"r{serial}"] = [output, None]
            serial += 1
        batch = len(live)
        if not batch:
            previous = None
            continue
        k = auto.next_table()[batch]
        ids = list(live)
        is_cold = cold.step([Row(r, 0, 1, live[r][1] is not None) for r in ids], k,
                            lambda i, n: [])
        decode = [r for r in ids if live[r][1] is not None]
        held = [live[r][1] for r in decode]
        at = [output - live[r][0] for r in decode]
        accepted = []
        for n, p in zip(held, at):
            a = alpha if late_alpha is None or p < early else late_alpha
            m = 0
            while m < n and rng.random() < a:
                m += 1
            accepted.append(m)
        warm = [r for r, c in zip(ids, is_cold) if not c]
        t = 0.010 + 1e-4 * (batch + sum(held))
        if k and warm:
            t += draft_fixed + k * (1e-3 + 1e-4 * len(warm))
        if step < slow_until and k and warm:
            t *= 3
        if step < plain_slow_until and not (k and warm):
            t *= plain_slow
        share = decode_share(k, previous, held, cold=True)
        t *= rng.uniform(0.98, 1.02)
        emitted = sum(1 + m for m in accepted)
        for r, m in zip(decode, accepted):
            live[r][0] -= 1 + m
        for r, c in zip(ids, is_cold):
            live[r][1] = 0 if c else k
            if live[r][0] <= 0:
                del live[r]
        cold.forget(live)
        # as the scheduler's hook sees it (patches/scheduler.py)
        warm_share = warm_requests.step(k, previous, [r for r in ids if r not in decode],
                                        dict(zip(decode, held)), [r for r in ids if r in live],
                                        [r for r in ids if r not in live])
        auto.observe(batch, k, 0, None if share is None else t,
                     [n for n in held if n], [m for n, m in zip(held, accepted) if n],
                     emitted, 1.0 if share is None else share, elapsed=t,
                     admitted=len(ids) - len(decode), warm_share=warm_share,
                     running=len(live),
                     positions=[p for n, p in zip(held, at) if n] if positions else None)
        seen.append((k, share, auto.table[concurrency], t, emitted))
        previous = k
    return seen


class NeverDrafts:
    """The controller's stand-in for an engine that never drafts: k = 0 at every step."""

    def __init__(self, max_batch: int = 4):
        self.table = [0] * (max_batch + 1)

    def next_table(self) -> list[int]:
        return self.table

    def observe(self, *args, **kwargs) -> None:
        pass


def tokens_per_second(seen) -> float:
    return sum(emitted for *_, emitted in seen) / sum(t for *_, t, _ in seen)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--gap", type=int, default=0,
                    help="a finished request's successor arrives after 0 to GAP steps")
    ap.add_argument("--draft-fixed", type=float, default=0.0,
                    help="seconds a step pays once when any row drafts")
    ap.add_argument("--slow-until", type=int, default=200,
                    help="before this step a step in which the draft runs takes 3x")
    ap.add_argument("--plain-slow-until", type=int, default=0,
                    help="before this step a step in which no row drafts takes 2x")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--seeds", type=seed_range, default=None, metavar="LO-HI",
                    help="run each seed and print the last steps' goodput against never drafting")
    ap.add_argument("--last", type=int, default=1000, help="with --seeds: the steps read")
    ap.add_argument("--explore-budget", type=float, default=AutoK.explore_budget,
                    help="AutoK.explore_budget (inf: explore on every turn)")
    args = ap.parse_args(argv)
    if args.seeds is not None:
        _over_seeds(args)
        return
    auto, scene = _controller(args), _scene(args, args.seed)
    seen = run(auto, args.steps, plain_slow_until=args.plain_slow_until, **scene)
    # (the engine that never drafts runs no slow moment of steps without drafts: against it
    # the windows after the moment read what drafting there cost)
    never = run(NeverDrafts(), args.steps, **scene)
    for i in range(0, len(seen), args.window):
        part = seen[i:i + args.window]
        shares = [s for k, s, *_ in part if s is not None and k]
        share = f"{sum(shares) / len(shares):.2f}" if shares else "-"
        rate = tokens_per_second(part)
        print(f"steps {i}-{i + len(part) - 1}: mean k "
              f"{sum(k for k, *_ in part) / len(part):.2f}, k chosen at the end {part[-1][2]}, "
              f"{len(shares)} samples at k > 0 with a mean share of rows drafting {share}, "
              f"{rate:.0f} tokens/s ({rate / tokens_per_second(never[i:i + args.window]):.2f}x "
              f"never drafting)")


def _controller(args) -> AutoK:
    auto = AutoK(4, 4, price_admission=True)
    auto.explore_budget = args.explore_budget
    return auto


def _scene(args, seed: int) -> dict:
    return dict(alpha=args.alpha, draft_fixed=args.draft_fixed, gap=args.gap,
                slow_until=args.slow_until, seed=seed)


def _over_seeds(args) -> None:
    ratios = []
    for seed in args.seeds:
        auto, scene = _controller(args), _scene(args, seed)
        seen = run(auto, args.steps, plain_slow_until=args.plain_slow_until, **scene)
        never = run(NeverDrafts(), args.steps, **scene)
        ratios.append(tokens_per_second(seen[-args.last:])
                      / tokens_per_second(never[-args.last:]))
        print(f"seed {seed}: the last {args.last} steps at {ratios[-1]:.4f}x never drafting, "
              f"k chosen at the end {auto.table[4]}")
    mean = statistics.fmean(ratios)
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    print(f"{len(ratios)} seeds: mean {mean:.4f}x, standard deviation {sd:.4f}, "
          f"{min(ratios):.4f}-{max(ratios):.4f}")


if __name__ == "__main__":
    main()
