"""The paged visual-mass Triton kernel against ``reference.visual_mass``.

The kernel runs under the Triton interpreter on CPU tensors, so these tests need no GPU. Caches
are built in vLLM's FlashAttention layout with shuffled block tables; every cache slot that no
row may read (unused blocks, the tail of a request's last block) holds NaN, so a stray read
shows up as a NaN mass. The reference gets each request's keys gathered by position. 16-bit
products are exact in float32, so the kernel differs from the reference only by summation order
and exp2 rounding: the tolerances are tight for every dtype.
"""


import numpy as np
import pytest
import torch

from lvspec_vllm.relevance.reference import visual_mass


from lvspec_vllm.kernels import visual_mass as K  # imported interpreted by conftest

BF16, FP16, FP32, FP8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn
ATOL = {FP32: 1e-5, BF16: 1e-4, FP16: 1e-4}  # by query dtype


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # Triton also reads the variable lazily at launch (e.g. when it first imports gluon).
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _bf16_dot_in_interpreter():
    """Triton 3.9's interpreter stores bf16 as uint16 and hands dot operands to np.matmul as
    they are, i.e. multiplies the bit patterns. Widen them to float32 first (exact, as a GPU's
    bf16 MMA with float32 accumulation), only for this module's tests."""
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.data.dtype != np.uint16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def patched(self, a, b, *args):
        return create_dot(self, widen(a), widen(b), *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_dot", patched)
        yield


def _key_cache(num_blocks, block_size, Hkv, D, dtype, layout):
    """The key half of one layer's cache as FlashAttentionImpl.forward takes it, filled with NaN.

    LBNHC / LBHNC: vLLM 0.32's logical [num_blocks, Hkv, block_size, 2D] in that physical order,
    keys = kv_cache.transpose(1, 2).split(D, dim=-1)[0] (strided); legacy: [2, num_blocks,
    block_size, Hkv, D].unbind(0)[0] (contiguous)."""
    def nan(*shape):
        return torch.full(shape, float("nan")).to(dtype)

    if layout == "legacy":
        return nan(2, num_blocks, block_size, Hkv, D).unbind(0)[0]
    if layout == "LBNHC":
        kv = nan(num_blocks, block_size, Hkv, 2 * D).transpose(1, 2)
    else:
        kv = nan(num_blocks, Hkv, block_size, 2 * D)
    return kv.transpose(1, 2).split(D, dim=-1)[0]


def _batch(seed, *, Hq, Hkv, D, block_size, requests, q_dtype=BF16, kv_dtype=BF16,
           layout="LBNHC", shuffle_rows=False, kv_scale=None):
    """requests: [(num_tokens, [(start, end) visual runs], [context length of each row])].
    Returns the kernel's arguments and each request's keys gathered by position (float32)."""
    g = torch.Generator().manual_seed(seed)
    B = len(requests)
    blocks = [-(-n // block_size) for n, _, _ in requests]
    max_blocks = max(blocks) + 2  # table entries past a request's blocks point at NaN blocks
    num_blocks = B * max_blocks + 7
    block_table = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    # fp8 is written through a float32 cache of the same layout
    cache = _key_cache(num_blocks, block_size, Hkv, D, FP32 if kv_dtype == FP8 else kv_dtype,
                       layout)
    slots = []
    for b, (n, _, _) in enumerate(requests):
        pos = torch.arange(n)
        slots.append((block_table[b, pos // block_size], pos % block_size))
        cache[slots[-1]] = (torch.randn(n, Hkv, D, generator=g) * 2 / (kv_scale or 1.0)).to(
            cache.dtype)
    if kv_dtype == FP8:
        cache = _key_cache(num_blocks, block_size, Hkv, D, FP8, layout).copy_(cache)
    gathered = [cache[slot].float() * (kv_scale or 1.0) for slot in slots]
    row_req = torch.tensor([b for b, (_, _, rows) in enumerate(requests) for _ in rows])
    ctx = torch.tensor([c for _, _, rows in requests for c in rows])
    if shuffle_rows:
        perm = torch.randperm(len(row_req), generator=g)
        row_req, ctx = row_req[perm], ctx[perm]
    R = len(row_req)
    query = (torch.randn(R, Hq, D, generator=g) * 2).to(q_dtype)
    runs = [r for _, ranges, _ in requests for r in ranges]
    args = dict(query=query, key_cache=cache, block_table=block_table.int(),
                row_req=row_req.int(), row_context_len=ctx.int(),
                visual_ranges=torch.tensor(runs, dtype=torch.int32).view(-1, 2),
                visual_range_req_start=torch.tensor(
                    [0] + [len(r) for _, r, _ in requests]).cumsum(0).int(),
                scale=D ** -0.5, kv_scale=kv_scale)
    return args, gathered


def _reference(args, gathered, requests):
    want = torch.full(args["query"].shape[:2], float("nan"))
    for b, (n, ranges, _) in enumerate(requests):
        visual = torch.zeros(n, dtype=torch.bool)
        for a, e in ranges:
            visual[a:e] = True
        rows = (args["row_req"] == b).nonzero().squeeze(1)
        want[rows] = visual_mass(args["query"][rows], gathered[b], visual,
                                 args["row_context_len"][rows], args["scale"])
    return want


def _check(requests, seed=0, **kw):
    args, gathered = _batch(seed, requests=requests, **kw)
    got = K.paged_visual_mass(**args)
    want = _reference(args, gathered, requests)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert not got.isnan().any(), "a NaN slot was read (or 0/0)"
    torch.testing.assert_close(got, want, atol=ATOL[args["query"].dtype], rtol=0)
    return got, want


# Context lengths not multiple of any block size, rows at the very start of the context and at
# range boundaries, adjacent / overlapping / empty / out-of-context runs, a request without runs.
MIXED = [
    (300, [(3, 40), (40, 41), (100, 230)], [1, 2, 4, 41, 42, 101, 300]),
    (77, [], [1, 77]),
    (129, [(0, 16), (5, 129), (60, 60)], [1, 17, 129]),
    (200, [(10, 12), (150, 400)], [11, 12, 151, 200]),
]

CONFIGS = {  # Hq, Hkv, D, block_size, query dtype, cache dtype
    "mha-bf16-d128-bs16": (4, 4, 128, 16, BF16, BF16),
    "gqa4-fp16-d64-bs16": (16, 4, 64, 16, FP16, FP16),
    "gqa5-qwen32b-heads-bf16-d128-bs16": (40, 8, 128, 16, BF16, BF16),
    "gqa5-bf16-d64-bs128": (10, 2, 64, 128, BF16, BF16),
    "gqa4-fp16-d128-bs128": (8, 2, 128, 128, FP16, FP16),
    "gqa4-bf16-d80-bs16": (8, 2, 80, 16, BF16, BF16),  # head size below its power-of-2 tile
    "gqa4-fp32-d64-bs16": (8, 2, 64, 16, FP32, FP32),
    "mha-fp32-query-bf16-cache-d64-bs128": (2, 2, 64, 128, FP32, BF16),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_mixed_batch_matches_reference(config):
    Hq, Hkv, D, bs, q_dtype, kv_dtype = config
    got, want = _check(MIXED, Hq=Hq, Hkv=Hkv, D=D, block_size=bs, q_dtype=q_dtype,
                       kv_dtype=kv_dtype)
    assert (got[7:9] == 0).all()  # request 1 has no visual run
    assert (got[0] == 0).all() and (got[2] > 0).all()  # position 3 is the first visual one
    assert 0.05 < want.mean() < 0.95  # masses far from trivially 0 or 1


@pytest.mark.parametrize("layout", ["LBHNC", "legacy"])
def test_other_cache_layouts_and_shuffled_rows(layout):
    _check(MIXED, seed=1, Hq=10, Hkv=2, D=64, block_size=16, layout=layout, shuffle_rows=True)


def test_strided_query():
    args, gathered = _batch(2, Hq=8, Hkv=2, D=64, block_size=16, requests=MIXED)
    R, Hq, D = args["query"].shape
    wide = torch.zeros(R, Hq * D + 32, dtype=args["query"].dtype)  # vLLM's [T, Hq * D] view
    wide[:, :Hq * D] = args["query"].view(R, -1)
    args["query"] = wide[:, :Hq * D].view(R, Hq, D)
    torch.testing.assert_close(K.paged_visual_mass(**args), _reference(args, gathered, MIXED),
                               atol=ATOL[BF16], rtol=0)


def test_fp8_cache_is_dequantised_with_kv_scale():
    _check(MIXED, Hq=8, Hkv=2, D=64, block_size=16, kv_dtype=FP8, kv_scale=0.37)


def test_fp8_cache_without_kv_scale_is_refused():
    args, _ = _batch(0, Hq=8, Hkv=2, D=64, block_size=16, requests=MIXED, kv_dtype=FP8,
                     kv_scale=0.5)
    with pytest.raises(ValueError, match="float8_e4m3fn.*kv_scale"):
        K.paged_visual_mass(**{**args, "kv_scale": None})


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.int8])
def test_other_cache_dtypes_are_refused(dtype):
    args, _ = _batch(0, Hq=4, Hkv=2, D=64, block_size=16, requests=MIXED)
    with pytest.raises(ValueError, match=str(dtype)):
        K.paged_visual_mass(**{**args, "key_cache": args["key_cache"].to(dtype)})


def test_long_visual_span():
    # 2,300 visual tokens between a short prefix and a text tail; Qwen's group of 5 heads
    _check([(2600, [(37, 2337)], [38, 2337, 2591, 2600])], Hq=5, Hkv=1, D=128, block_size=16)


def test_32_requests():
    g = torch.Generator().manual_seed(3)
    requests = []
    for b in range(32):
        n = int(torch.randint(20, 160, (1,), generator=g))
        cuts = sorted(torch.randint(0, n + 10, (2 * (b % 4),), generator=g).tolist())
        runs = list(zip(cuts[::2], cuts[1::2]))
        requests.append((n, runs, [int(torch.randint(1, n, (1,), generator=g)), n]))
    _check(requests, Hq=4, Hkv=2, D=64, block_size=16, shuffle_rows=True)


def test_no_rows():
    args, _ = _batch(0, Hq=6, Hkv=2, D=64, block_size=16, requests=[(40, [(0, 10)], [])])
    out = K.paged_visual_mass(**args)
    assert out.shape == (0, 6) and out.dtype == torch.float32


def test_no_visual_run_in_the_whole_batch():
    got, _ = _check([(50, [], [1, 50]), (20, [], [20])], Hq=4, Hkv=1, D=64, block_size=16)
    assert (got == 0).all()


def test_empty_context_gives_zero():
    # the reference is 0/0 there; the kernel writes 0 (no verify row has an empty context)
    args, _ = _batch(0, Hq=4, Hkv=2, D=64, block_size=16, requests=[(30, [(0, 30)], [0, 5])])
    out = K.paged_visual_mass(**args)
    assert (out[0] == 0).all() and torch.allclose(out[1], torch.ones(4))


def test_one_launch_for_the_batch(monkeypatch):
    grids = []
    kernel = K._paged_visual_mass_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_paged_visual_mass_kernel", Counting())
    _check(MIXED, Hq=8, Hkv=2, D=64, block_size=16)
    assert grids == [(16, 2)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only host")
def test_bench_needs_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        K.main(["--bench"])
