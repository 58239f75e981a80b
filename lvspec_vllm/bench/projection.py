"""Projected speedup on one GPU from measured acceptance and a roofline cost model.

    lvspec-bench project RUN.json [RUN.json ...] [--gpu h100-sxm] [--pair qwen2.5-vl-32b]
                         [--weight-bytes 1] [--context 8192] [--concurrency 1,4,16,64]

The acceptance comes from runs of ``lvspec-bench offline`` (``run-<mode>.json``): the share of
drafts accepted up to each position, P_j, from vLLM's per-position counter. The costs are not
measured (no GPU runs vLLM here); they come from this stated model, whose every input is printed.

One decode step at batch B with k draft tokens per request:

    T(B, k)    = T_t(B, B * (k + 1)) + k * T_d(B, B)      k draft forwards; T(B, 0) is decoding
                                                         without speculation (no draft at all)
    T_m(B, N)  = max(bytes_m / (BW * eta_mem), flops_m / (FLOPS * eta_flops))   N rows, model m
    bytes_m    = weights read per forward + B * context * KV bytes per token
    flops_m    = N * (2 * params + 4 * layers * context * attention width)
    E(k)       = 1 + P_1 + ... + P_k                             tokens per request and step
    speedup    = E(k) * T(B, 0) / T(B, k)

Weights are read once per forward whatever the rows; each request's KV cache is read once per
forward (its k + 1 query rows share it); the draft's own video encoding and prefill are left
out (once per request, not per step). Memory: weights of both models (vision towers included)
and the KV caches of both for ``concurrency`` requests of ``context`` tokens must fit in the
GPU; a level that does not fit is reported as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float        # bytes
    bandwidth: float     # bytes/s, peak
    flops_bf16: float    # dense, peak
    flops_fp8: float


@dataclass(frozen=True)
class LM:
    """A decoder's decode-time figures. ``params_read``: weights read per forward (layers and
    LM head; the embedding lookup reads only its rows). ``params_total``: with vision tower and
    embeddings, for the memory check."""
    name: str
    params_read: float
    params_total: float
    layers: int
    attention_width: int     # query heads x head dim
    kv_bytes_per_token: int  # bf16 K and V over all layers

    def forward_cost(self, batch: int, rows: int, context: int, weight_bytes: float):
        bytes_ = self.params_read * weight_bytes + batch * context * self.kv_bytes_per_token
        flops = rows * (2 * self.params_read + 4 * self.layers * context * self.attention_width)
        return bytes_, flops


GPUS = {
    "h100-sxm": GPU("H100 SXM 80 GB", 80e9, 3.35e12, 989e12, 1979e12),
    "h200": GPU("H200 141 GB", 141e9, 4.8e12, 989e12, 1979e12),
}

# Qwen2.5-VL configs (hidden, layers, heads): 32B 5120 x 64 (40 q / 8 kv heads of 128, MLP
# 27648); 7B 3584 x 28 (28 / 4, MLP 18944); vocabulary 152064, untied LM head.
QWEN25VL_32B = LM("Qwen2.5-VL-32B", 32.0e9, 33.5e9, 64, 40 * 128, 2 * 64 * 8 * 128 * 2)
QWEN25VL_7B = LM("Qwen2.5-VL-7B", 7.07e9, 8.3e9, 28, 28 * 128, 2 * 28 * 4 * 128 * 2)
PAIRS = {"qwen2.5-vl-32b": (QWEN25VL_32B, QWEN25VL_7B)}


@dataclass(frozen=True)
class Setting:
    gpu: GPU
    target: LM
    draft: LM
    weight_bytes: float = 1.0   # 1: FP8 weights, 2: bf16
    context: int = 8192
    eta_mem: float = 0.8        # share of peak bandwidth a decode GEMV reaches
    eta_flops: float = 0.6      # share of peak FLOPS a verify GEMM reaches

    def bounds(self, lm: LM, batch: int, rows: int) -> tuple[float, float]:
        """Seconds for one forward if bound by memory, and if bound by compute."""
        b, f = lm.forward_cost(batch, rows, self.context, self.weight_bytes)
        peak = self.gpu.flops_fp8 if self.weight_bytes <= 1 else self.gpu.flops_bf16
        return b / (self.gpu.bandwidth * self.eta_mem), f / (peak * self.eta_flops)

    def _time(self, lm: LM, batch: int, rows: int) -> float:
        return max(self.bounds(lm, batch, rows))

    def step_time(self, batch: int, k: int) -> float:
        t = self._time(self.target, batch, batch * (k + 1))
        if k == 0:
            return t
        return t + k * self._time(self.draft, batch, batch)

    def fits(self, batch: int) -> bool:
        weights = (self.target.params_total + self.draft.params_total) * self.weight_bytes
        kv = batch * self.context * (self.target.kv_bytes_per_token
                                     + self.draft.kv_bytes_per_token)
        return weights + kv <= self.gpu.memory * 0.9  # vLLM's default gpu_memory_utilization

    def max_batch(self) -> int:
        b = 0
        while self.fits(b + 1):
            b += 1
        return b


def expected_tokens(p_cum: list[float], k: int) -> float:
    """E(k) = 1 + P_1 + ... + P_k, with P_j the share of drafts accepted through position j."""
    if k > len(p_cum):
        raise ValueError(f"acceptance measured for k <= {len(p_cum)}, asked for k = {k}")
    return 1.0 + sum(p_cum[:k])


def speedup(setting: Setting, p_cum: list[float], batch: int, k: int) -> float:
    return (expected_tokens(p_cum, k) * setting.step_time(batch, 0)
            / setting.step_time(batch, k))


def best_k(setting: Setting, p_cum: list[float], batch: int) -> tuple[int, float]:
    options = [(speedup(setting, p_cum, batch, k), -k) for k in range(len(p_cum) + 1)]
    s, neg_k = max(options)
    return -neg_k, s


def acceptance_from_run(run: dict) -> list[float]:
    """P_j from a ``run-<mode>.json``: accepted at position j over drafts."""
    m = run["metrics"]
    drafts = m.get("vllm:spec_decode_num_drafts", 0)
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    if not drafts or not per_pos:
        raise ValueError(f"run {run.get('mode')!r} has no per-position acceptance (k = 0?)")
    return [a / drafts for a in per_pos]


def table(setting: Setting, runs: dict[str, list[float]], levels: list[int]) -> str:
    s = setting
    cap = s.max_batch()
    lines = [
        f"{s.gpu.name}, target {s.target.name}, draft {s.draft.name}, weights "
        f"{'FP8' if s.weight_bytes <= 1 else 'bf16'}, KV bf16, context {s.context} tokens, "
        f"bandwidth x {s.eta_mem}, FLOPS x {s.eta_flops}; at most {cap} such requests fit",
        "",
        "| run | mean accepted length (k = 4) | " + " | ".join(
            f"B = {b}: best k, speedup (k = 4)" for b in levels) + " |",
        "|---|---|" + "---|" * len(levels)]
    for label, p in runs.items():
        cells = []
        for b in levels:
            if b > cap:
                cells.append("does not fit")
                continue
            k, best = best_k(s, p, b)
            fixed = speedup(s, p, b, min(4, len(p)))
            cells.append(f"k = {k}: {best:.2f}x ({fixed:.2f}x)")
        lines.append(f"| {label} | {expected_tokens(p, min(4, len(p))):.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| B | step without speculation (ms) | with k = 4 (ms) | draft share of the "
              "k = 4 step | k = 4 verify: memory / compute (ms) |", "|---|---|---|---|---|"]
    for b in levels:
        t0, t4 = s.step_time(b, 0), s.step_time(b, 4)
        draft = 4 * s._time(s.draft, b, b)
        mem, compute = s.bounds(s.target, b, 5 * b)
        bound = "memory" if mem >= compute else "compute"
        lines.append(f"| {b} | {1e3 * t0:.1f} | {1e3 * t4:.1f} | {100 * draft / t4:.0f} % | "
                     f"{1e3 * mem:.1f} / {1e3 * compute:.1f}: {bound}-bound |")
    return "\n".join(lines) + "\n"


def main(args) -> None:
    target, draft = PAIRS[args.pair]
    setting = Setting(GPUS[args.gpu], target, draft, args.weight_bytes, args.context)
    runs = {}
    for path in args.runs:
        run = json.loads(Path(path).read_text())
        label = args.label.pop(0) if args.label else f"{run['mode']} ({Path(path).parent.name})"
        runs[label] = acceptance_from_run(run)
    print(table(setting, runs, args.concurrency), end="")
