"""Where an engine step's time goes, phase by phase: no speculation against a speculative engine.

    python -m lvspec_vllm.bench.step_phases --target DIR --draft DIR [--modes none,k0]
        [--max-num-seqs 16] [--repeat 8] [--rounds 3] [--max-tokens 32] [--out FILE]

Each mode runs in its own process (a ``vllm.LLM`` with the model in the engine core's process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the modes in turn for ``--rounds`` rounds. A run decodes
the world's 16 held-out videos ``--repeat`` times, ``--max-num-seqs`` at a time, greedy, every
request ``--max-tokens`` long. The phases are vLLM's own methods, each wrapped with a clock in
the benchmark's process only (no LVSpec code path changes); a phase's time includes the phases
it calls. Printed: per phase the median over rounds of its microseconds per engine step, each
mode's steps and output tokens/s. (At k = 0 every mode takes the same steps; at k > 0 fewer.)
Then the same over the steady k = 0 steps only (a step at k = 0 after one at k = 0: with
``auto-cold``, the steps its table spends without speculation), where what a speculative
engine costs beyond ``none`` is its overhead alone, not its drafting.

The last two phases are ``auto_k``'s own (``auto-cold`` only): the scheduler hook's work after
vLLM's update, and the controller's choice in it.

Modes: ``none`` (no speculative config), ``k0`` (LVSpec, vLLM's schedule at k = 0 for every
batch size, cold requests: a speculative engine that drafts nothing), ``k0-warm`` (the same
without cold requests), ``k0-spec-path`` (``k0`` with ``plain_k0_steps`` off: every step on
vLLM's speculative path), ``k4`` (LVSpec at k = 4), ``auto-cold`` (``auto_k`` with cold
requests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = {
    "none": None,
    "k0": {"num_speculative_tokens_per_batch_size": [[1, 256, 0]], "draft_cold_requests": True},
    "k0-warm": {"num_speculative_tokens_per_batch_size": [[1, 256, 0]]},
    # k0 on vLLM's speculative path in every step, as before plain_k0_steps
    "k0-spec-path": {"num_speculative_tokens_per_batch_size": [[1, 256, 0]],
                     "draft_cold_requests": True, "plain_k0_steps": False},
    "k4": {},
    "auto-cold": {"auto_k": True, "draft_cold_requests": True},
}
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
PHASES = [
    "vllm.v1.engine.core:EngineCore.step",
    "vllm.v1.core.sched.scheduler:Scheduler.schedule",
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
    *(f"{_RUNNER}.{m}" for m in (
        "execute_model", "_update_states", "_prepare_inputs", "_calc_spec_decode_metadata",
        "_build_attention_metadata", "_preprocess", "_model_forward", "sample_tokens", "_sample",
        "propose_draft_token_ids", "_copy_draft_token_ids_to_cpu", "_bookkeeping_sync")),
    "vllm.v1.worker.block_table:BlockTable.compute_slot_mapping",
    # LVSpec's drafter, inside GPUModelRunner._update_states: whether a step takes vLLM's plain
    # path (its rows, cold requests and deferred passes planned)
    "lvspec_vllm.drafter.proposer:LVSpecDrafter.begin_plain_step",
    "lvspec_vllm.drafter.cold:ColdRequests.step",
    # auto_k's own, inside Scheduler.update_from_output: the read before vLLM's update, the
    # hook's work after it, and in that the parts: the warm requests, the controller's
    # bookkeeping, its choice (the fit included) and the log line and /metrics
    "lvspec_vllm.patches.scheduler:AutoKController.positions",
    "lvspec_vllm.patches.scheduler:AutoKController.after_step",
    "lvspec_vllm.auto_k:WarmRequests.step",
    "lvspec_vllm.auto_k:AutoK.observe",
    "lvspec_vllm.auto_k:AutoK.next_table",
    "lvspec_vllm.patches.scheduler:AutoKController._report",
]


_STEP = "EngineCore.step"


def _clock_phases(totals: dict[str, list], steady: dict[str, list]) -> None:
    """Wrap each phase with a clock. ``totals``: per phase [seconds, calls] over every step;
    ``steady``: the same over the steps that ran at k = 0 after a step at k = 0 (their k is
    what ``Scheduler.schedule`` set; no speculative config: 0), where a speculative engine's
    step is one without speculation, so what it costs beyond one is overhead."""
    import importlib

    state = {"k": None, "previous": None, "step": {}}

    for phase in PHASES:
        module, _, path = phase.partition(":")
        owner_name, attr = path.rsplit(".", 1)
        owner = importlib.import_module(module)
        for part in owner_name.split("."):
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        static = isinstance(vars(owner).get(attr), staticmethod)
        name = path

        def clocked(*args, __f=original, __name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                out = __f(*args, **kwargs)
                if __name == "Scheduler.schedule":
                    state["k"] = getattr(out, "num_spec_tokens_to_schedule", None) or 0
                return out
            finally:
                step = state["step"]
                entry = step.setdefault(__name, [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
                if __name == _STEP:  # the outermost phase: the step is done
                    k_now = state["k"]
                    into = [totals] + ([steady] if k_now == 0 == state["previous"] else [])
                    for target in into:
                        for phase_name, (seconds, calls) in step.items():
                            t = target.setdefault(phase_name, [0.0, 0])
                            t[0] += seconds
                            t[1] += calls
                    state["previous"], state["k"], state["step"] = k_now, None, {}
        setattr(owner, attr, staticmethod(clocked) if static else clocked)


def run_one(args) -> dict:
    """One mode in this process: warm up, then time one pass over the requests."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    totals: dict[str, list] = {}  # phase -> [seconds, calls]
    steady: dict[str, list] = {}  # the same over steady k = 0 steps
    # around the plugin's patches, so that a phase a patch shortens is timed as it runs
    import lvspec_vllm

    lvspec_vllm.register()
    _clock_phases(totals, steady)
    from vllm import LLM, SamplingParams

    from lvspec_vllm.world import data, scenes

    kwargs = dict(model=args.target, dtype="float32", max_model_len=1024, seed=0,
                  max_num_seqs=args.max_num_seqs, enforce_eager=True,
                  limit_mm_per_prompt={"video": 1}, enable_prefix_caching=False)
    options = MODES[args.mode]
    if options is not None:
        kwargs["speculative_config"] = {"method": "lvspec", "model": args.draft,
                                        "num_speculative_tokens": 4, "loose": True, **options}
    llm = LLM(**kwargs)
    prompt = data.chat_prompt("Describe this video.")
    requests = [{"prompt": prompt,
                 "multi_modal_data": {"video": (scenes.render(s), scenes.video_metadata())}}
                for s in data.held_out(16)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(requests * 2, params, use_tqdm=False)  # warm-up: the same batch shapes
    totals.clear()
    steady.clear()
    t0 = time.perf_counter()
    outs = llm.generate(requests * args.repeat, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return {"mode": args.mode, "elapsed_s": elapsed,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "steps": totals.get(_STEP, [0.0, 0])[1],
            "seconds": {name: entry[0] for name, entry in totals.items()},
            "k0_steps": steady.get(_STEP, [0.0, 0])[1],
            "k0_seconds": {name: entry[0] for name, entry in steady.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--modes", default="none,k0")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=8, help="passes over the 16 videos")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON with every round")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one run, in a child process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        with open(args.result, "w") as f:
            json.dump(run_one(args), f)
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(MODES)}")
    import tempfile

    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                result = os.path.join(tmp, f"{m}-{r}.json")
                subprocess.run([sys.executable, "-m", "lvspec_vllm.bench.step_phases",
                                "--target", args.target, "--draft", args.draft,
                                "--max-num-seqs", str(args.max_num_seqs),
                                "--repeat", str(args.repeat), "--max-tokens",
                                str(args.max_tokens), "--mode", m, "--result", result],
                               check=True, stdout=subprocess.DEVNULL)
                with open(result) as f:
                    runs[m].append(json.load(f))
                run = runs[m][-1]
                print(f"[step_phases] round {r} {m}: "
                      f"{run['output_tokens'] / run['elapsed_s']:.0f} tokens/s", flush=True)
    print(table(runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f)


def table(runs: dict[str, list[dict]]) -> str:
    """Per phase, the median over rounds of its microseconds per engine step; then the same
    over the steps at k = 0 that followed a step at k = 0 (every step of ``none`` and ``k0``)."""
    modes = list(runs)

    def row(label, cells) -> str:
        return f"| {label} | " + " | ".join(f"{c:.0f}" for c in cells) + " |"

    def section(title, seconds, steps) -> list[str]:
        lines = [f"| phase, {title} | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for name in (p.partition(":")[2] for p in PHASES):
            cells = [statistics.median(r.get(seconds, {}).get(name, 0.0) * 1e6
                                       / max(r.get(steps, 0), 1) for r in runs[m])
                     for m in modes]
            if any(cells):
                lines.append(row(name, cells))
        return lines + [row("steps", [statistics.median(r.get(steps, 0) for r in runs[m])
                                      for m in modes])]

    every = section("us per step", "seconds", "steps") + [row(
        "output tokens/s", [statistics.median(r["output_tokens"] / r["elapsed_s"]
                                              for r in runs[m]) for m in modes])]
    return "\n".join(every + [""] + section("us per steady k = 0 step", "k0_seconds", "k0_steps"))


if __name__ == "__main__":
    main()
