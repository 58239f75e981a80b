"""Time one verify step: vLLM's rejection sampler against LVSpec's, in one process.

    lvspec-bench-verify [--batch 1 8 64] [--k 4 8 16] [--vocab 152064] [--repeat 5]

Synthetic greedy verify batches with Qwen2.5's vocabulary (60 % of drafts the target's argmax,
20 % its second choice, 20 % random), the same inputs for every sampler:
  stock   vllm.v1.sample.rejection_sampler.RejectionSampler
  strict  LVSpecRejectionSampler with the default (strict) options
  loose   LVSpecRejectionSampler, loose without identification, every rule on
Prints a markdown table of the median time per step and the ratio to stock.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _drafts(logits: torch.Tensor, ks: list[int], gen: torch.Generator) -> list[list[int]]:
    drafts, start = [], 0
    for k in ks:
        rows = logits[start:start + k].float()
        top2 = rows.topk(2, dim=1).indices
        pick = torch.rand(k, generator=gen)
        d = torch.where(pick < 0.6, top2[:, 0], torch.where(
            pick < 0.8, top2[:, 1], torch.randint(0, logits.shape[1], (k,), generator=gen)))
        drafts.append(d.tolist())
        start += k + 1
    return drafts


def _time(fn, repeat: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=1024,
                    help="embedding width for the semantic rule (Qwen2.5-VL-32B: 5120)")
    ap.add_argument("--dtype", default="bfloat16", help="logits dtype (vLLM's model dtype)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    from lvspec_vllm.config import LVSpecConfig
    from lvspec_vllm.sampler import LVSpecRejectionSampler
    from lvspec_vllm.testing.verify_batch import fake_runner, sampling_metadata, spec_metadata

    current_platform.register_triton_kernel_overrides()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(args.vocab, args.hidden, generator=gen).to(device, torch.bfloat16)
    guards = torch.zeros(args.vocab, dtype=torch.bool, device=device)
    guards[:16] = True
    loose_options = {"loose": True, "anchor_identification": False}

    def lvspec(options: dict, req_ids: list[str]) -> LVSpecRejectionSampler:
        s = LVSpecRejectionSampler(Sampler(), None, device, LVSpecConfig.from_dict(options),
                                   runner=fake_runner(req_ids, [True] * len(req_ids)))
        s._guard_mask, s._embeddings = guards, embeddings  # no tokenizer or model here
        return s

    print(f"device={device} vocab={args.vocab} logits={args.dtype} hidden={args.hidden} "
          f"repeat={args.repeat} (median ms per verify step)\n")
    print("| batch | k | stock ms | LVSpec strict ms | ratio | LVSpec loose ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batch:
        for k in args.k:
            ks = [k] * B
            logits = (torch.randn(B * (k + 1), args.vocab, generator=gen) * 3).to(
                device, getattr(torch, args.dtype))
            drafts = _drafts(logits.cpu(), ks, gen)
            meta = spec_metadata(drafts, device)
            sm = sampling_metadata([0.0] * B, device=device)
            req_ids = [f"r{i}" for i in range(B)]
            stock = RejectionSampler(Sampler())
            strict, loose = lvspec({}, req_ids), lvspec(loose_options, req_ids)
            t = {name: _time(lambda s=s: s(meta, None, logits.clone(), sm), args.repeat, sync)
                 for name, s in (("stock", stock), ("strict", strict), ("loose", loose))}
            print(f"| {B} | {k} | {t['stock']:.2f} | {t['strict']:.2f} | "
                  f"{t['strict'] / t['stock']:.2f} | {t['loose']:.2f} | "
                  f"{t['loose'] / t['stock']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
