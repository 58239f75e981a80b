"""Held-out attribute accuracy of a world model under HF transformers (greedy)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from . import data, language, scenes


def accuracy(references: list[dict], candidates: list[dict]) -> dict[str, float | None]:
    """Per attribute and overall: share of the reference's facts the candidates state the same."""
    hit, total = Counter(), Counter()
    for ref, cand in zip(references, candidates):
        for field, (h, t) in language.score(ref, cand).items():
            hit[field] += h
            total[field] += t
    # None where the references state no such fact (e.g. a reference caption with no objects)
    out = {f: hit[f] / total[f] if total[f] else None for f in total}
    out["all"] = sum(hit.values()) / sum(total.values()) if sum(total.values()) else None
    return out


def generate(model, processor, scene_list, question="Describe this video.", max_new_tokens=48,
             batch_size=32) -> list[str]:
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = []
    try:
        for i in range(0, len(scene_list), batch_size):
            chunk = scene_list[i:i + batch_size]
            prompts = [data.chat_prompt(question)] * len(chunk)
            if getattr(model.config, "vision_config", None) is None:  # a text-only draft
                enc = data.text_only(tok, prompts)
                # generate() derives positions from the mask; the text draft has no video to
                # describe anyway, so its held-out score is only a floor
                enc.pop("position_ids")
            else:
                enc = processor(text=prompts, videos=[scenes.render(s) for s in chunk],
                                padding=True, return_tensors="pt",
                                videos_kwargs=dict(do_sample_frames=False, video_metadata=[
                                    scenes.video_metadata()] * len(chunk)))
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = "right"
    return texts


def evaluate(model, processor, n: int = 200) -> tuple[dict[str, float], list[str]]:
    held = data.held_out(n)
    texts = generate(model, processor, held)
    acc = accuracy([language.truth(s) for s in held], [language.parse_caption(t) for t in texts])
    return acc, texts


def _load(path):
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    arch = AutoConfig.from_pretrained(path).architectures[0]
    if arch == "Qwen2ForCausalLM":
        return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    from lvspec_vllm.testing import mrope

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    mrope.install(model)  # the positions vLLM uses
    return model


def main(argv=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", help="an exported world checkpoint directory")
    ap.add_argument("-n", type=int, default=200, help="held-out videos")
    ap.add_argument("--show", type=int, default=5, help="captions to print")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = _load(args.model)
    proc = AutoProcessor.from_pretrained(args.model)
    acc, texts = evaluate(model.eval(), proc, args.n)
    for t in texts[: args.show]:
        print("  ", t)
    print(json.dumps({k: round(v, 4) for k, v in acc.items()}))


if __name__ == "__main__":
    main()
