"""The Triton verify kernel against the torch reference, field by field.

The kernel runs under the Triton interpreter on CPU tensors, so these tests need no GPU.
Cosines and the top-3 entropy are the only values the kernel rounds differently from torch;
every generated case is checked to keep them away from their thresholds, so each decision must
match exactly.
"""

import math
import os
import sys

import pytest
import torch

from lvspec_vllm.verify import rules as R


from lvspec_vllm.kernels import verify_prefix as K  # imported interpreted by conftest



@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # Triton also reads the variable lazily at launch (e.g. when it first imports gluon).
    monkeypatch.setenv("TRITON_INTERPRET", "1")


INF = float("inf")
FIELDS = ("num_accepted", "rule", "anchor", "stop", "target_argmax")
MARGIN = 1e-4  # cosine / entropy distance to their thresholds that rounding cannot cross


def _away_from_thresholds(b, params):
    """Assert no cosine or entropy the rules compare sits within MARGIN of its threshold."""
    d = b["draft_token_ids"].long()
    z = b["logits"].float()
    t = z.argmax(1)
    req = R.request_index(b["cu_num_draft_tokens"])
    if params.semantic and b["embeddings"] is not None:
        w = params.shift_window if params.shift else 0
        for s in range(0, w + 1):
            if s >= len(d):
                break
            same = req[s:] == req[:len(d) - s]
            cos = R._cosine(d[s:], t[:len(d) - s], b["embeddings"])[same]
            assert ((cos - params.semantic_threshold).abs() > MARGIN).all()
    if params.entropy_gate is not None:
        temp = b["temperature"].float()[req]
        p3 = torch.softmax(torch.topk(z / temp[:, None], k=min(3, z.shape[1]), dim=1).values, 1)
        ent = -(p3 * torch.log(p3.clamp_min(1e-30))).sum(1)
        ent = ent[ent.isfinite()]
        assert ((ent - params.entropy_gate).abs() > MARGIN).all()


def _counts(b):
    cu = b["cu_num_draft_tokens"]
    return torch.diff(cu, prepend=cu.new_zeros(1)).int()


def _check(b, params):
    _away_from_thresholds(b, params)
    ref = R.verify_reference(**b, params=params)
    out = K.verify_triton(**b, params=params)
    for field in FIELDS:
        want, got = getattr(ref, field), getattr(out, field)
        assert got.dtype == want.dtype, field
        assert torch.equal(got, want), f"{field}:\n ref    {want.tolist()}\n triton {got.tolist()}"
    return ref


def _batch(seed, *, B, V, kmax=16, kmin=1, H=32, dtype=torch.float32, C=4, embeddings=True,
           relevance=True, guard_frac=0.03):
    """A random batch whose drafts exercise every rule: the target's argmax (exact), a close
    runner-up (plausible), a synonym (semantic: token pairs with near-identical embeddings), 1-3
    inserted fillers before the draft rejoins (shift), a random token, a banned (-inf) token."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    ks = torch.randint(kmin, kmax + 1, (B,), generator=g)
    cu = ks.cumsum(0)
    T = int(cu[-1])
    z = torch.randn(T, V, generator=g) * 2
    emb = torch.randn(V, H, generator=g)
    partner = torch.randperm(V, generator=g)
    synonyms = rand(V) < 0.5
    emb[synonyms] = emb[partner[synonyms]] + 0.05 * torch.randn(int(synonyms.sum()), H, generator=g)
    d = torch.randint(0, V, (T,), generator=g)  # fillers and random drafts keep these
    for lo, hi in zip((cu - ks).tolist(), cu.tolist()):
        j = lo
        while j < hi:
            kind, t = float(rand(1)), int(z[j].argmax())
            if kind < 0.45:
                d[j] = t
            elif kind < 0.6:
                d[j] = int(z[j].topk(3).indices[randint(1, 2)])
                z[j, d[j]] = z[j].max() - 2 * float(rand(1))
            elif kind < 0.7:
                d[j] = int(partner[t])
            elif kind < 0.9 and j + 1 < hi:
                j += randint(1, min(3, hi - 1 - j))  # d[j'..j-1] are the inserted fillers
                d[j] = t if rand(1) < 0.7 else int(partner[t])
                z[j, d[j]] = z[j].max() + (1.0 if rand(1) < 0.5 else -0.3)
            elif kind < 0.95:
                z[j, d[j]] = -INF
            j += 1
    thr = torch.tensor([(-INF, INF, INF, 0.85)[i] for i in torch.randint(0, 4, (B,), generator=g)])
    codebook = torch.randint(0, V, (B, C), generator=g)
    codebook[rand(B, C) < 0.6] = -1
    return dict(draft_token_ids=d, cu_num_draft_tokens=cu, logits=z.to(dtype),
                temperature=0.5 + 1.5 * rand(B), relevance=rand(T) if relevance else None,
                anchor_threshold=thr, codebook=codebook, guard_mask=rand(V) < guard_frac,
                embeddings=emb if embeddings else None)


P = R.VerifyParams
PARAMS = [
    P(),
    P(semantic=False, shift=False),
    P(plausibility=False, shift_window=8),
    P(plausibility=False, semantic=False, shift_window=1, max_loose_per_step=0),
    P(shift_window=3, entropy_gate=0.5, max_loose_per_step=1),
    P(shift_window=5, entropy_gate=0.9, max_loose_per_step=3, semantic_threshold=0.95),
    P(plausibility_ratio=0.05, plausibility_top_k=1, shift_window=4),
    P(plausibility=False, semantic=False, shift=False),
]


@pytest.mark.parametrize("params", PARAMS, ids=[f"p{i}" for i in range(len(PARAMS))])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_batches_small_vocab(seed, params):
    _check(_batch(seed, B=6, V=64, embeddings=seed == 0, C=(0, 4)[seed]), params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_random_batches_half_precision_logits(dtype):
    _check(_batch(7, B=6, V=100, dtype=dtype), P(shift_window=3, entropy_gate=0.7,
                                                  max_loose_per_step=3))


def test_qwen_vocabulary():
    b = _batch(3, B=2, V=152_064, kmin=6, H=64, dtype=torch.bfloat16)
    # ties for the maximum in different BLOCK_V chunks: the lowest index wins
    top = b["logits"][0].max()
    b["logits"][0, [150_000, 70_001, 9_000]] = top
    b["draft_token_ids"][0] = 70_001
    _check(b, P(shift_window=4, entropy_gate=0.9, max_loose_per_step=3))


def test_batch_of_256():
    _check(_batch(4, B=256, V=128, kmax=8), P(shift_window=3, max_loose_per_step=2))


# -- adversarial batches ------------------------------------------------------------------------

def _uniform(drafts, V=16, **kw):
    """Loose requests (threshold +inf), no relevance, an empty codebook, no guards, one-hot
    embeddings (no synonyms) and every logit 0, unless the test says otherwise."""
    T, B = sum(map(len, drafts)), len(drafts)
    b = dict(draft_token_ids=torch.tensor([d for r in drafts for d in r]),
             cu_num_draft_tokens=torch.tensor([len(r) for r in drafts]).cumsum(0),
             logits=torch.zeros(T, V), temperature=torch.ones(B), relevance=None,
             anchor_threshold=torch.full((B,), INF), codebook=torch.full((B, 2), -1),
             guard_mask=torch.zeros(V, dtype=torch.bool), embeddings=torch.eye(V))
    b.update(kw)
    return b


def _one_hot(targets, V=16):
    return torch.nn.functional.one_hot(torch.tensor(targets), V).float() * 5


def _mask(ids, V=16):
    m = torch.zeros(V, dtype=torch.bool)
    m[ids] = True
    return m


def test_ties_at_the_row_maximum():
    b = _uniform([[3, 5, 9, 1], [7, 7]], V=5000)
    b["logits"][:, [7, 3, 4200, 4999]] = 5.0  # ties inside and across BLOCK_V chunks
    b["logits"][1, 7] = 4.0
    b["logits"][4, 5] = 5.0
    for params in (P(), P(plausibility_top_k=1), P(plausibility=False, semantic=False)):
        _check(b, params)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf
def test_whole_rows_of_equal_logits():
    b = _uniform([[0, 4, 9, 2], [11, 0]])
    for params in (P(), P(entropy_gate=2.0), P(entropy_gate=0.5), P(plausibility_top_k=1)):
        _check(b, params)
    b["logits"][:] = -INF  # nothing is emittable; argmax is 0 like torch.argmax
    _check(b, P(entropy_gate=0.5))


def test_banned_drafts_are_never_loose():
    b = _uniform([[5, 6, 7], [5]], embeddings=torch.ones(16, 4))  # every pair is a synonym
    b["logits"][:, 9] = 1.0
    b["logits"][[0, 3], 5] = -INF
    b["logits"][2, :] = -INF
    b["logits"][2, 6] = 0.0
    for params in (P(), P(entropy_gate=2.0), P(shift_window=2)):
        _check(b, params)


def test_top3_entropy_across_chunks():
    # V = 10000 streams in three BLOCK_V chunks; plant each row's top 3 in random chunks
    g = torch.Generator().manual_seed(12)
    b = _uniform([[1] * 8, [2] * 8], V=10_000, embeddings=None)
    b["logits"] = torch.randn(16, 10_000, generator=g) - 6
    for j in range(16):
        idx = torch.randperm(10_000, generator=g)[:3]
        b["logits"][j, idx] = torch.tensor([3.0, 2.0, 1.0]) + torch.rand(3, generator=g) * 2
    b["logits"][3, 5000] = b["logits"][3].max()  # a duplicated maximum counts twice
    for gate in (0.6, 0.8, 1.0):
        _check(b, P(entropy_gate=gate))


def test_shift_edge_cases():
    p = P(plausibility=False, semantic=False)
    # the draft inserted 5 and 6 before rejoining the target at 7
    b = _uniform([[5, 6, 7, 8]], logits=_one_hot([7, 1, 7, 8]))
    assert _check(b, p).num_accepted.tolist() == [4]
    # the rejoining position may be an anchor when it is exact; an inserted token may not
    for v in ([0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]):
        _check({**b, "relevance": torch.tensor(v), "anchor_threshold": torch.tensor([0.5])}, p)
    # nor banned, nor low-entropy (rows 0, 2, 3 get two close runner-ups, row 1 stays peaked)
    banned = b["logits"].clone()
    banned[1, 6] = -INF
    _check({**b, "logits": banned}, p)
    flat = b["logits"].clone()
    flat[[0, 2, 3], 10:12] = 4.9
    _check({**b, "logits": flat}, P(plausibility=False, semantic=False, entropy_gate=0.5))
    # an inserted token that matches its own row is exact and free of budget
    _check(_uniform([[5, 1, 7]], logits=_one_hot([7, 1, 7])), P(max_loose_per_step=1))
    _check(_uniform([[5, 1, 7]], logits=_one_hot([7, 1, 7])), P(max_loose_per_step=0))
    # never across the request boundary
    _check(_uniform([[5], [7, 1]], logits=_one_hot([7, 7, 1])), p)


def test_draft_always_or_never_the_argmax():
    b = _batch(5, B=8, V=64, kmax=16)
    t = b["logits"].argmax(1)
    assert torch.equal(_check({**b, "draft_token_ids": t}, P()).num_accepted, _counts(b))
    never = {**b, "draft_token_ids": (t + 1) % 64}
    for params in (P(), P(plausibility=False, semantic=False, shift=False)):
        _check(never, params)
    _check({**never, "anchor_threshold": torch.full((8,), -INF)}, P())


def test_single_draft_requests_and_windows_wider_than_k():
    _check(_batch(6, B=32, V=64, kmax=1), P(shift_window=8, entropy_gate=0.5))
    _check(_batch(8, B=12, V=64, kmax=3), P(shift_window=8, max_loose_per_step=3))


def test_requests_without_drafts():
    _check(_uniform([[], [5, 7], []], logits=_one_hot([7, 7])), P())


def test_guard_tokens_everywhere():
    b = _batch(9, B=6, V=64, guard_frac=1.0)
    ref = _check(b, P(shift_window=4))
    stopped = ref.num_accepted < _counts(b)
    assert (ref.stop[stopped] == R.STOP_GUARD).all()


def test_values_exactly_at_thresholds():
    # plausibility ratio and relevance threshold compare with >=; top-k counts ties for the draft
    ratio = P().plausibility_ratio
    gap = torch.tensor(math.log(ratio)).item()  # the float32 value the rules compare against
    b = _uniform([[5], [5], [5], [6, 6]], V=16, relevance=torch.tensor([0.5, 0.25, 0.5, 0.5, 0.5]),
                 anchor_threshold=torch.tensor([0.5, 0.5, INF, INF]))
    b["logits"][:, 9] = 2.0
    b["logits"][[0, 1, 2], 5] = 2.0 + gap
    b["logits"][3, [6, 1, 2, 3, 4]] = 1.5  # four logits tie with the draft, none above but 9
    b["logits"][4, 6] = 2.0 + gap - 1e-6
    for top_k, accepted in ((5, [0, 1, 1, 1]), (2, [0, 1, 1, 1]), (1, [0, 0, 0, 0])):
        ref = _check(b, P(semantic=False, plausibility_top_k=top_k))
        assert ref.num_accepted.tolist() == accepted


def test_tiny_vocab_and_zero_embeddings():
    # fewer than 3 logits for the top-3 entropy; zero-norm embeddings have cosine 0
    b = _uniform([[1, 0], [1]], V=2, embeddings=torch.zeros(2, 8),
                 logits=torch.tensor([[0.0, 1.0], [3.0, 2.5], [0.5, 0.0]]))
    for params in (P(entropy_gate=0.3), P(entropy_gate=0.9, semantic_threshold=-0.5)):
        _check(b, params)


def test_input_layouts_and_dtypes():
    b = _batch(10, B=4, V=64)
    wide = torch.zeros(b["logits"].shape[0], 80)
    wide[:, :64] = b["logits"]
    _check({**b, "logits": wide[:, :64], "embeddings": b["embeddings"].bfloat16(),
            "draft_token_ids": b["draft_token_ids"].int(),
            "cu_num_draft_tokens": b["cu_num_draft_tokens"].int(), "codebook": b["codebook"].int(),
            "temperature": b["temperature"].double(), "relevance": b["relevance"].double(),
            "anchor_threshold": b["anchor_threshold"].double()}, P(shift_window=3))


def test_one_kernel_launch_for_a_mixed_batch(monkeypatch):
    launches = []
    kernel = K._verify_prefix_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_verify_prefix_kernel", Counting())
    b = _batch(11, B=5, V=64)
    assert len(set(b["cu_num_draft_tokens"].diff().tolist())) > 1  # mixed k
    _check(b, P(shift_window=3, entropy_gate=0.5, max_loose_per_step=2))
    assert launches == [(5,)]
