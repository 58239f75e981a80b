"""LVSpecRejectionSampler: vLLM's rejection sampler with LVSpec's verification in front of it.

vLLM's ``RejectionSampler.forward`` changes every release, so it is never copied. LVSpec hooks
``apply_logits_processors`` (which ``forward`` calls on the draft rows' logits, after
penalties and bad-words masks and before temperature, top-k/top-p and the accept kernels):

1. ``lvspec_vllm.verify.rules`` decides, per request, the accepted draft prefix from those
   processed logits (a draft the target cannot emit is never loosely accepted);
2. each loosely accepted position gets its draft token's logit raised far above the row, the way
   vLLM 0.33's FLy verifier encodes lossy accepts: for greedy rows the draft becomes the argmax,
   for sampled rows its probability becomes 1, so the standard p/q test accepts it;
3. ``super().forward`` emits the tokens with vLLM's own kernels.

Emitted tokens are therefore always a prefix of the draft plus one target token (the scheduler
relies on it). Logprobs returned to users come from ``raw_target_logits``, which vLLM copies
before ``apply_logits_processors``, so they are the target's real distribution; the processed
logprobs modes, which would see the raised logits, are refused at startup with loose
verification. In strict mode nothing is raised and the output is exactly vLLM's.
"""

from __future__ import annotations

import math
import os
import time

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler

from lvspec_vllm import metrics
from lvspec_vllm._logging import get_logger
from lvspec_vllm.config import LVSpecConfig
from lvspec_vllm.verify import rules
from lvspec_vllm.verify.state import RequestStates

logger = get_logger(__name__)

# Counter slots, on the device so the verify path never waits for the host.
COUNTERS = ("verify_steps", "draft_tokens", "accepted_tokens", "exact", "plausible", "semantic",
            "shifted", "rejected_anchor", "rejected_guard", "rejected_no_rule", "rejected_budget",
            "rejected_entropy", "rejected_strict", "rejected_standard")
_C = {name: i for i, name in enumerate(COUNTERS)}
_LOG_INTERVAL_S = 10.0
# Benchmarks only: a JSON file of token ids that are visual anchor words. With it the sampler
# also counts how its anchor test agrees with those labels (identification precision/recall).
ANCHOR_LABELS_ENV = "LVSPEC_ANCHOR_LABELS"
# Far above any real logit, small enough that logit / temperature stays finite in float32.
_BOOST = 1.0e4


def _is_first_tp_rank() -> bool:
    # Every rank reaches the same decisions; one of them reports, like vLLM's output rank.
    from vllm.distributed import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank() == 0
    except AssertionError:  # no TP group: a single process outside an engine
        return True


def verify_params(config: LVSpecConfig) -> rules.VerifyParams:
    return rules.VerifyParams(
        plausibility=config.plausibility, plausibility_ratio=config.plausibility_ratio,
        plausibility_top_k=config.plausibility_top_k, semantic=config.semantic,
        semantic_threshold=config.semantic_threshold, shift=config.shift,
        shift_window=config.shift_window, entropy_gate=config.entropy_gate,
        max_loose_per_step=config.max_loose_per_step)


class LVSpecRejectionSampler(RejectionSampler):
    def __init__(self, sampler, spec_config, device, lvspec_config: LVSpecConfig, runner=None,
                 relevance=None):
        super().__init__(sampler, spec_config, device)
        self.relevance = relevance  # RelevanceCapture (anchors, or draft pruning's scores)
        self.lvspec_config = lvspec_config
        self.params = verify_params(lvspec_config)
        self.runner = runner
        self.states = RequestStates()
        self.counts = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        self._guard_mask: torch.Tensor | None = None
        self._embeddings: torch.Tensor | None = None
        self._decision: tuple | None = None
        self._last_log = time.monotonic()
        self._publisher = None
        # Anchor decisions on the rows each step reached, for requests that identify anchors.
        self.identification = dict.fromkeys(
            ("scored_rows", "anchor_rows", "labelled_rows", "labelled_anchor_rows"), 0)
        self._labels: frozenset[int] = frozenset()
        if os.environ.get(ANCHOR_LABELS_ENV):
            import json

            with open(os.environ[ANCHOR_LABELS_ENV]) as f:
                self._labels = frozenset(json.load(f))
        if os.environ.get(metrics.ENV) and _is_first_tp_rank():
            self._publisher = metrics.MetricsPublisher(COUNTERS, os.environ[metrics.ENV],
                                                       gauges=self.gauges)
        logger.info("LVSpec rejection sampler installed (verification: %s)",
                    lvspec_config.describe())

    # -- the hook -------------------------------------------------------------------------------
    def apply_logits_processors(self, logits, sampling_metadata, metadata):
        logits = super().apply_logits_processors(logits, sampling_metadata, metadata)
        if self.lvspec_config.loose and metadata.draft_token_ids.numel():
            result = self._verify(logits, sampling_metadata, metadata)
            loose = result.rule >= rules.PLAUSIBLE
            rows = loose.nonzero()[:, 0]
            drafts = metadata.draft_token_ids[rows].long()
            logits[rows, drafts] = logits[rows].max(dim=-1).values + _BOOST
            self._decision = (result, loose)
        return logits

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        self._decision = None
        if not metadata.draft_token_ids.numel():
            return self._sample_without_drafts(metadata, logits, sampling_metadata)
        output = super().forward(metadata, draft_probs, logits, sampling_metadata)
        self._count(metadata, output.sampled_token_ids)
        self._maybe_log()
        return output

    def _sample_without_drafts(self, metadata, logits, sampling_metadata):
        """A step that verifies nothing (k = 0): each request's one row sampled as vLLM's
        rejection sampler samples its bonus row (the same sampler call, so the same tokens,
        greedy or seeded), without its verify kernels over zero drafts, which on the CPU cost
        a tenth of a small model's step. With logprobs asked for, vLLM's own path."""
        if sampling_metadata.max_num_logprobs is not None:
            return super().forward(metadata, None, logits, sampling_metadata)
        # without drafts each request has one logits row, its bonus row, in order: no gather
        out = self.sampler(logits=logits,
                           sampling_metadata=sampling_metadata, predict_bonus_token=True)
        return SamplerOutput(sampled_token_ids=out.sampled_token_ids.to(torch.int32),
                             logprobs_tensors=None)

    # -- decisions ------------------------------------------------------------------------------
    def _verify(self, logits, sampling_metadata, metadata) -> rules.VerifyResult:
        cfg = self.lvspec_config
        num_reqs = len(metadata.num_draft_tokens)
        req_ids = self.runner.input_batch.req_ids[:num_reqs]
        live = self.runner.requests
        self.states.retain(live)
        thresholds = []
        for req_id in req_ids:
            request = live[req_id]
            stops = request.sampling_params.all_stop_token_ids if request.sampling_params else ()
            self.states.get(req_id, initial_codebook=sorted(stops))
            if not request.mm_features:  # no visual evidence to tell anchors from fillers
                thr = -math.inf if cfg.text_only_requests == "strict" else math.inf
            elif cfg.anchor_identification:
                thr = self.states.threshold(req_id, cfg.relevance_mode, cfg.relevance_threshold,
                                            cfg.relevance_sigma)
            else:  # the no-identification ablation: every non-guarded position may be loose
                thr = math.inf
            thresholds.append(thr)
        device = logits.device
        relevance = self._relevance(metadata)
        temperature = sampling_metadata.temperature
        if temperature is None:  # all greedy: plausibility on the unscaled distribution
            temperature = torch.ones(num_reqs, device=device)
        else:
            temperature = torch.where(temperature[:num_reqs] > 0, temperature[:num_reqs], 1.0)
        embeddings = self._embedding_rows()
        verify = rules.verify_reference
        if device.type == "cuda" and not callable(embeddings):
            # one launch for the batch; the reference is its spec (and serves sharded rows)
            from lvspec_vllm.kernels.verify_prefix import verify_triton as verify
        result = verify(
            metadata.draft_token_ids, metadata.cu_num_draft_tokens, logits, temperature,
            relevance, torch.tensor(thresholds, device=device),
            self.states.codebook_tensor(req_ids, device), self._guards(logits.shape[-1], device),
            embeddings, self.params)
        if relevance is not None:
            self._remember(req_ids, metadata, relevance, thresholds, result)
        return result

    def _relevance(self, metadata) -> torch.Tensor | None:
        """v_j of every draft row: mean visual mass over the selected layers and all heads."""
        capture = self.relevance
        if capture is None or capture.mass_sum is None:
            return None
        from vllm.distributed import (get_tensor_model_parallel_world_size,
                                      tensor_model_parallel_all_reduce)

        mass = capture.mass_sum
        tp = get_tensor_model_parallel_world_size()
        if tp > 1:  # heads are sharded: sum the ranks' masses before any threshold
            mass = tensor_model_parallel_all_reduce(mass.clone())
        tokens = metadata.logits_indices[metadata.target_logits_indices].long()
        return mass[tokens] / (len(capture.layers) * capture.heads * tp)

    def _remember(self, req_ids, metadata, relevance, thresholds, result) -> None:
        """Relevance history and the sticky codebook, from the rows this step reached."""
        cu = [0] + metadata.cu_num_draft_tokens.tolist()
        v, t = relevance.tolist(), result.target_argmax.tolist()
        accepted = result.num_accepted.tolist()
        for r, req_id in enumerate(req_ids):
            if not math.isfinite(thresholds[r]):
                continue  # strict or unidentified request: no history to keep
            lo, hi = cu[r], cu[r + 1]
            reached = range(lo, min(lo + accepted[r] + 1, hi))
            self.states.get(req_id).add_relevance(v[j] for j in reached)
            anchors = [t[j] for j in reached if v[j] >= thresholds[r]]
            self.states.add_anchors(req_id, anchors)
            ident = self.identification
            ident["scored_rows"] += len(reached)
            ident["anchor_rows"] += len(anchors)
            if self._labels:
                ident["labelled_rows"] += sum(t[j] in self._labels for j in reached)
                ident["labelled_anchor_rows"] += sum(a in self._labels for a in anchors)

    def _guards(self, vocab: int, device) -> torch.Tensor:
        """[V] bool: EOS, every special token, and the configured guard words."""
        if self._guard_mask is None or self._guard_mask.numel() != vocab:
            from vllm.tokenizers.registry import get_tokenizer

            model_config = self.runner.model_config
            tok = get_tokenizer(model_config.tokenizer,
                                trust_remote_code=model_config.trust_remote_code)
            ids = set(tok.all_special_ids)
            # chat and vision markers are added tokens flagged special, not all in all_special_ids
            ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                    if getattr(t, "special", False)}
            if tok.eos_token_id is not None:
                ids.add(tok.eos_token_id)
            for word in self.lvspec_config.guard_words:
                for variant in (word, " " + word):
                    pieces = tok.encode(variant, add_special_tokens=False)
                    if pieces:
                        ids.add(pieces[0])
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[[i for i in ids if 0 <= i < vocab]] = True
            self._guard_mask = mask.to(device)
        return self._guard_mask

    def _embedding_rows(self):
        """The target's input embeddings for the semantic rule (None if unused): the [V, H]
        matrix, or under tensor parallelism the vocab-sharded module itself, whose forward
        gathers full rows on every rank (an all-reduce that every rank runs in step)."""
        if not self.params.semantic:
            return None
        if self._embeddings is None:
            from vllm.distributed import get_tensor_model_parallel_world_size
            from vllm.model_executor.layers.vocab_parallel_embedding import (
                ParallelLMHead, VocabParallelEmbedding)

            module = next(m for m in self.runner.model.modules()
                          if isinstance(m, VocabParallelEmbedding)
                          and not isinstance(m, ParallelLMHead))
            sharded = get_tensor_model_parallel_world_size() > 1
            self._embeddings = module if sharded else module.weight
        return self._embeddings

    # -- what was decided -----------------------------------------------------------------------
    def _count(self, metadata, sampled_token_ids: torch.Tensor) -> None:
        device = self.counts.device
        num_drafts = torch.tensor(metadata.num_draft_tokens, device=device)
        emitted = (sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1)
        accepted = (emitted - 1).clamp_min(0)
        delta = torch.zeros_like(self.counts)
        delta[_C["verify_steps"]] = 1
        delta[_C["draft_tokens"]] = num_drafts.sum()
        delta[_C["accepted_tokens"]] = accepted.sum()
        rejected = accepted < num_drafts
        if self._decision is None:  # strict: every accepted token is an exact match
            delta[_C["exact"]] = accepted.sum()
            delta[_C["rejected_strict"]] = rejected.sum()
        else:
            result, loose = self._decision
            req = rules.request_index(metadata.cu_num_draft_tokens)
            start = metadata.cu_num_draft_tokens - num_drafts
            pos = torch.arange(req.numel(), device=device) - start[req]
            kept = pos < accepted[req]  # positions vLLM actually accepted
            by_rule = torch.bincount(result.rule.long()[kept], minlength=5)
            delta[_C["exact"]] = accepted.sum() - by_rule[rules.PLAUSIBLE:].sum()
            delta[_C["plausible"]] = by_rule[rules.PLAUSIBLE]
            delta[_C["semantic"]] = by_rule[rules.SEMANTIC]
            delta[_C["shifted"]] = by_rule[rules.SHIFTED]
            # A request stopped where LVSpec stopped it, or earlier by vLLM's p/q test.
            ours = rejected & (accepted == result.num_accepted.to(device))
            by_stop = torch.bincount(result.stop.long()[ours], minlength=6)
            for code, name in ((rules.STOP_ANCHOR, "anchor"), (rules.STOP_GUARD, "guard"),
                               (rules.STOP_NO_RULE, "no_rule"), (rules.STOP_BUDGET, "budget"),
                               (rules.STOP_ENTROPY, "entropy")):
                delta[_C[f"rejected_{name}"]] = by_stop[code]
            delta[_C["rejected_standard"]] = (rejected & ~ours).sum()
        self.counts += delta
        self.publish_metrics()

    def publish_metrics(self) -> None:
        """Hand the counters to the publisher (a non-blocking copy; its thread reads the
        gauges, the drafter's counts among them, and writes both out)."""
        if self._publisher is not None:
            self._publisher.publish(self.counts)

    def gauges(self) -> dict[str, float]:
        keys = self.relevance.key_bytes() if self.relevance is not None else 0
        drafter = getattr(self.runner, "drafter", None)
        draft_cache = drafter.cache_bytes() if hasattr(drafter, "cache_bytes") else 0
        drafted = drafter.counts if hasattr(drafter, "counts") else {}
        return {"live_request_states": len(self.states), "captured_key_bytes": keys,
                "draft_encoder_cache_bytes": draft_cache,
                "draft_visual_tokens": drafted.get("visual_tokens_in", 0),
                "draft_pruned_visual_tokens": drafted.get("pruned_visual_tokens", 0),
                "draft_seconds": drafted.get("draft_us", 0) / 1e6,
                "draft_skipped_steps": drafted.get("skipped_passes", 0),
                "draft_plain_steps": drafted.get("plain_steps", 0),
                "draft_plain_cold_steps": drafted.get("plain_cold_steps", 0),
                "draft_deferred_tokens": drafted.get("deferred_tokens", 0),
                "draft_caught_up_tokens": drafted.get("caught_up_tokens", 0),
                "draft_cold_requests": drafted.get("cold_requests", 0)}

    def snapshot(self) -> dict[str, int]:
        return {**dict(zip(COUNTERS, self.counts.tolist())), **self.identification}

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < _LOG_INTERVAL_S:
            return
        self._last_log = now
        c = self.snapshot()
        logger.info(
            "LVSpec verify: accepted %d of %d draft tokens (exact %d, plausible %d, semantic %d, "
            "shifted %d); rejections: anchor %d, guard %d, no rule %d, budget %d, entropy %d, "
            "strict %d, p/q %d; live request states %d",
            c["accepted_tokens"], c["draft_tokens"], c["exact"], c["plausible"], c["semantic"],
            c["shifted"], c["rejected_anchor"], c["rejected_guard"], c["rejected_no_rule"],
            c["rejected_budget"], c["rejected_entropy"], c["rejected_strict"],
            c["rejected_standard"], len(self.states))


def worker_report(worker) -> dict:
    """What LVSpec installed in one worker and what it verified; for ``LLM.collective_rpc``."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner
    sampler = getattr(runner, "rejection_sampler", None)
    report = {"tp_rank": get_tensor_model_parallel_rank(),
              "drafter": type(getattr(runner, "drafter", None)).__name__,
              "rejection_sampler": type(sampler).__name__}
    if isinstance(sampler, LVSpecRejectionSampler):
        report.update(sampler.snapshot(), **sampler.gauges())
    counts = getattr(getattr(runner, "drafter", None), "counts", None)
    if counts is not None:
        report.update({f"drafter_{k}": v for k, v in counts.items()})
    return report
