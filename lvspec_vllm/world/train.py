"""Train a world model (target or draft) from scratch on CPU: deterministic and resumable.

    lvspec-train-world target --out DIR [--steps N] [--threads T]

Step s draws its batch from a generator seeded by (role, s), so a run stopped at any checkpoint
and resumed produces the same batches as one that never stopped. Every --ckpt-every steps the
model, optimiser and step are saved atomically to DIR/ckpt.pt and an HF checkpoint is exported to
DIR/hf (fp32 safetensors with the tokenizer, processor and generation config), which is what
vLLM loads. Every --eval-every steps greedy captions of held-out videos are scored; the log
(DIR/train.log, JSON lines) keeps loss, throughput and accuracy per attribute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

from ..testing import mrope
from . import data, evaluate, models


def default_root() -> Path:
    root = os.environ.get("LVSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lvspec_vllm")
    return Path(root) / "world-v3"


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def export(model, processor, tok, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    models.write_generation_config(tmp, tok)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> None:
    import torch
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration,
                              Qwen2ForCausalLM)

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=sorted([*models.SIZES, *models.TEXT_ONLY]))
    ap.add_argument("--out", type=Path, help="default: <cache>/world-v3/<role>")
    ap.add_argument("--steps", type=int, default=20000, help="total steps of the LR schedule")
    ap.add_argument("--stop-at", type=int, help="stop (resumably) after this step")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--noise", type=float, default=3.0, help="pixel noise std (augmentation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=128)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = args.out or default_root() / args.role
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        models.build_tokenizer(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok.padding_side = "right"
    proc = models.processor(tok)

    torch.manual_seed({"target": 0, "draft": 1}.get(args.role, 2))
    text_only = args.role in models.TEXT_ONLY
    if text_only:
        model = Qwen2ForCausalLM(models.text_config(models.TEXT_ONLY[args.role], tok))
    else:
        model = Qwen2_5_VLForConditionalGeneration(models.model_config(args.role, tok))
        mrope.install(model)  # train on the positions vLLM will use
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step = 0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.role}: {n_params / 1e6:.2f} M parameters, {out}", flush=True)

    log = open(out / "train.log", "a")
    stop = min(args.steps, args.stop_at or args.steps)
    t0, seen, loss_acc = time.time(), 0, 0.0
    model.train()
    while step < stop:
        rng = random.Random(f"{args.role}-{step}")
        items = [data.example(rng) for _ in range(args.batch)]
        enc = data.batch(proc, items, noise=args.noise, seed=step, video=not text_only)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        loss = model(**enc).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += 1
        loss_acc += loss.item()
        if step % 50 == 0:
            rec = {"step": step, "loss": round(loss_acc / seen, 4),
                   "steps_per_s": round(seen / (time.time() - t0), 3),
                   "lr": g["lr"], "time": time.time()}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, seen, loss_acc = time.time(), 0, 0.0
        if step % args.ckpt_every == 0 or step == stop:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
            tmp.rename(ckpt)
            export(model, proc, tok, out / "hf")
        if step % args.eval_every == 0 or step == stop:
            model.eval()
            te = time.time()
            acc, texts = evaluate.evaluate(model, proc, args.eval_n)
            model.train()
            rec = {"step": step, "eval": {k: round(v, 4) for k, v in acc.items()},
                   "eval_s": round(time.time() - te, 1), "sample": texts[:2]}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, seen, loss_acc = time.time(), 0, 0.0


if __name__ == "__main__":
    main()
