"""Visual attention mass straight from vLLM's paged KV cache, as one Triton kernel.

For every verify row ``r`` and query head ``h``, ``paged_visual_mass`` computes what
``lvspec_vllm.relevance.reference.visual_mass`` computes for one request,

    m[r, h] = sum over visual keys i < ctx_r of softmax_i(q_rh . k_i * scale)
            = exp(LSE_visual - LSE_all)                 (softmax over all keys i < ctx_r)

for a whole batch at once, reading the keys from the paged cache instead of a gathered copy:
0 when no visual key is in context, query head ``h`` reads KV head ``h // (Hq // Hkv)``.

Cache layout. ``key_cache`` is the key half of one layer's cache exactly as vLLM's
FlashAttention backend hands it to flash-attn: ``[num_blocks, block_size, num_kv_heads,
head_size]`` with any strides. vLLM 0.32/0.33 store a layer as ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]`` (physical order set by the KV cache layout, LBNHC by default) and
``FlashAttentionImpl.forward`` takes ``kv_cache.transpose(1, 2).split(head_size, dim=-1)[0]``;
older releases' ``kv_cache.unbind(0)`` of ``[2, num_blocks, block_size, num_kv_heads,
head_size]`` gives the same shape, contiguous. Both views are read in place, never copied.
Keys are post-RoPE. Token ``t`` of request ``b`` sits at block ``block_table[b, t //
block_size]``, offset ``t % block_size``, where ``block_size`` is ``key_cache.shape[1]`` (the
kernel block size: pass the ``attn_metadata.block_table`` flash-attn gets). An fp8 cache
(``torch.float8_e4m3fn``, vLLM's ``fp8``/``fp8_e4m3``) is dequantised with the per-tensor
``kv_scale`` (``layer._k_scale_float``); any other dtype but bf16/fp16/fp32 is refused.

Kernel. One launch, grid ``(R, Hkv)``: a program takes one row and one KV head, i.e. the
``G = Hq // Hkv`` query heads that share it as one ``[G, D]`` tile, and streams the row's
context through the block table ``BLOCK_N`` tokens at a time (the rows of a request, adjacent
in vLLM's batch order, run side by side and so read each key at about the same time, mostly
out of L2). It keeps one running max and two online sums, over all keys and over the visual
keys, and writes ``m = l_visual / l_all``. Membership needs no per-token test: the context is
walked as the alternating text gaps and visual ranges of the row's request, so each tile is
wholly text or wholly visual. This needs a request's ranges sorted by start (vLLM sorts
``mm_features`` by position); overlapping, empty or out-of-context ranges are fine. Scores are
a ``tl.dot`` in the query's 16-bit dtype (products exact, float32 accumulation, like the
reference's float32 einsum) or, for a float32 query or a cache of the other 16-bit dtype, an
IEEE float32 dot; everything after is float32.

    python -m lvspec_vllm.kernels.visual_mass --bench

times it on CUDA at Qwen2.5-VL-32B's shapes (see ``bench``).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
import triton.language as tl

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
BLOCK_N = 64  # tokens per tile
# Software pipelining depth. The block-table load feeds the key load, so the pipeliner needs
# 5 stages to keep two key tiles in flight (3 and 4 give one); 72 registers, 37 KB of shared
# memory per program at Qwen2.5-VL's shapes on sm_90 (from an offline compile; untuned).
NUM_STAGES = 5


@triton.jit
def _scan(q, m, l_all, l_vis, k_head, bt_row, start, end, stride_kb, stride_ks, stride_kd,
          qk_scale, D: tl.constexpr, VISUAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
          DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """Fold the keys at positions [start, end) into the running (max, sum all, sum visual),
    all in log2 units; the tokens are all visual (VISUAL) or all text."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + offs_n
        valid = t < end
        blk = tl.load(bt_row + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        # K^T tile [BLOCK_D, BLOCK_N]: each token's head_size run is contiguous in the cache
        kt = tl.load(k_head + blk[None, :] * stride_kb + (t % BLOCK_SIZE)[None, :] * stride_ks
                     + offs_d[:, None] * stride_kd,
                     mask=valid[None, :] & (offs_d < D)[:, None], other=0.0)
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        # every tile holds a valid key, so m_new is finite and alpha is 0 on the first tile
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.sum(tl.exp2(s - m_new[:, None]), 1)
        l_all = l_all * alpha + p
        l_vis = l_vis * alpha
        if VISUAL:
            l_vis += p
        m = m_new
    return m, l_all, l_vis


@triton.jit
def _paged_visual_mass_kernel(
        q_ptr, stride_qr, stride_qh, stride_qd,
        k_ptr, stride_kb, stride_ks, stride_kh, stride_kd,
        bt_ptr, stride_bt, row_req_ptr, ctx_ptr, ranges_ptr, range_start_ptr,
        out_ptr, stride_or, qk_scale, G: tl.constexpr, D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    kh = tl.program_id(1)
    b = tl.load(row_req_ptr + r).to(tl.int64)
    ctx = tl.load(ctx_ptr + r).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kh * G + offs_g
    q = tl.load(q_ptr + r * stride_qr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0).to(DOT_DTYPE)
    k_head = k_ptr + kh * stride_kh
    bt_row = bt_ptr + b * stride_bt

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_G], tl.float32)
    l_vis = tl.zeros([BLOCK_G], tl.float32)
    lo = tl.load(range_start_ptr + b)
    hi = tl.load(range_start_ptr + b + 1)
    # the text gap before each range, then the range, clipped to [cursor, ctx); the extra last
    # step (i == hi) is the text after the last range
    cursor = tl.zeros((), tl.int32)
    for i in range(lo, hi + 1):
        a = tl.load(ranges_ptr + 2 * i, mask=i < hi, other=ctx).to(tl.int32)
        e = tl.load(ranges_ptr + 2 * i + 1, mask=i < hi, other=ctx).to(tl.int32)
        a = tl.minimum(tl.maximum(a, cursor), ctx)
        e = tl.minimum(tl.maximum(e, a), ctx)
        m, l_all, l_vis = _scan(q, m, l_all, l_vis, k_head, bt_row, cursor, a,
                                stride_kb, stride_ks, stride_kd, qk_scale, D, False,
                                BLOCK_SIZE, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_D)
        m, l_all, l_vis = _scan(q, m, l_all, l_vis, k_head, bt_row, a, e,
                                stride_kb, stride_ks, stride_kd, qk_scale, D, True,
                                BLOCK_SIZE, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_D)
        cursor = e

    mass = l_vis / tl.where(l_all > 0, l_all, 1.0)  # an empty context has l_vis == l_all == 0
    tl.store(out_ptr + r * stride_or + heads, mass, mask=offs_g < G)


def paged_visual_mass(query: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                      row_req: torch.Tensor, row_context_len: torch.Tensor,
                      visual_ranges: torch.Tensor, visual_range_req_start: torch.Tensor,
                      scale: float, kv_scale: float | None = None) -> torch.Tensor:
    """Per-head visual attention mass of every verify row of a batch (see module doc).

    query                   [R, Hq, D] bf16/fp16/fp32, post-RoPE, any strides
    key_cache               [num_blocks, block_size, Hkv, D] bf16/fp16/fp32/float8_e4m3fn,
                            any strides (FlashAttention's key view of a layer's cache)
    block_table             [B, max_blocks] int32, in blocks of key_cache.shape[1] tokens
    row_req                 [R] int32, the request of each row
    row_context_len         [R] int32, row r attends to positions [0, row_context_len[r])
    visual_ranges           [n, 2] int32 (start, end) visual position runs, grouped by request
                            and sorted by start within a request
    visual_range_req_start  [B + 1] int32, request b's runs are
                            visual_ranges[visual_range_req_start[b]:visual_range_req_start[b+1]]
    scale                   softmax scale of the attention layer
    kv_scale                dequantisation scale of an fp8 cache (required for fp8 only)
    returns                 [R, Hq] float32; 0 for a row with no visual key (or no key) in context
    """
    R, Hq, D = query.shape
    _, block_size, Hkv, Dk = key_cache.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"query {tuple(query.shape)} does not fit key_cache "
                         f"{tuple(key_cache.shape)}: need the same head size and Hq % Hkv == 0")
    if query.dtype not in _DOT_DTYPES:
        raise ValueError(f"paged_visual_mass: unsupported query dtype {query.dtype}")
    if key_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"paged_visual_mass: unsupported KV cache dtype {key_cache.dtype} "
                         f"(supported: {', '.join(map(str, _CACHE_DTYPES))})")
    if key_cache.dtype == torch.float8_e4m3fn:
        if kv_scale is None:
            raise ValueError("paged_visual_mass: a torch.float8_e4m3fn KV cache needs its "
                             "kv_scale (the layer's _k_scale_float) to dequantise the keys")
    else:
        kv_scale = 1.0 if kv_scale is None else kv_scale
    out = torch.empty(R, Hq, dtype=torch.float32, device=query.device)
    if R == 0:
        return out
    # 16-bit products are exact in float32, so a 16-bit dot loses nothing against the
    # reference; a float32 query (or a cache of another 16-bit type) needs an IEEE float32 dot.
    if query.dtype != torch.float32 and key_cache.dtype in (query.dtype, torch.float8_e4m3fn):
        dot_dtype, precision = _DOT_DTYPES[query.dtype], "tf32"  # (only fp32 dots read it)
    else:
        dot_dtype, precision = tl.float32, "ieee"
    G = Hq // Hkv
    ranges = visual_ranges.contiguous()
    _paged_visual_mass_kernel[(R, Hkv)](
        query, *query.stride(), key_cache, *key_cache.stride(),
        block_table, block_table.stride(0), row_req, row_context_len,
        ranges if ranges.numel() else visual_range_req_start,  # not read without ranges
        visual_range_req_start, out, out.stride(0), scale * kv_scale * math.log2(math.e), G, D,
        BLOCK_SIZE=block_size, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(D), num_warps=4, num_stages=NUM_STAGES)
    return out


# -- benchmark ------------------------------------------------------------------------------------

def _copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    stop.record()
    stop.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(stop) * 1e-3)


def bench(batches=(1, 4, 8, 16, 32), layers: int = 3, iters: int = 20) -> None:
    """Qwen2.5-VL-32B on one GPU: 40 query heads, 8 KV heads, head size 128, a bf16 cache of
    block size 16 in vLLM's default (LBNHC) FlashAttention layout, shuffled block tables; per
    request 64 text tokens, 16,384 visual tokens and 448 text tokens, k = 8 drafts, i.e. 9
    verify rows at the end of the context. A step is ``layers`` launches, each on its own
    layer's cache and queries, replayed from a CUDA graph so that launch overhead is not timed.

    Bytes "as read" count what the kernel loads: every (row, KV head) program its row's keys
    and block-table entries (the rows of a request mostly hit L2 for each other's keys, so this
    can exceed DRAM bandwidth), plus queries and outputs. "Unique" counts every key once, the
    least DRAM traffic any kernel needs."""
    from lvspec_vllm.relevance.reference import visual_mass

    Hq, Hkv, D, bs, k = 40, 8, 128, 16, 8
    pre, n_vis, post = 64, 16_384, 448
    N = pre + n_vis + post
    blocks_per_req = triton.cdiv(N, bs)
    scale = D ** -0.5
    copy_bw = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw / 1e9:.0f} GB/s "
          f"(read + write)")
    print(f"Hq={Hq} Hkv={Hkv} D={D}, bf16 cache, block size {bs}; {N} tokens per request "
          f"({n_vis} visual), {k + 1} rows per request, {layers} launches per step")
    table = ["| batch | rows | us/step | us/launch | MB as read | GB/s | of copy "
             "| MB unique | GB/s | of copy |", "|" + "---|" * 10]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B in batches:
        num_blocks = B * blocks_per_req

        def key_cache():
            # a layer's [num_blocks, Hkv, block_size, 2D] cache, stored LBNHC, and its key half
            # as FlashAttentionImpl.forward takes it
            kv_cache = torch.randn(num_blocks, bs, Hkv, 2 * D, generator=gen, device="cuda",
                                   dtype=torch.bfloat16).transpose(1, 2)
            return kv_cache.transpose(1, 2).split(D, dim=-1)[0]

        keys = [key_cache() for _ in range(layers)]
        block_table = torch.randperm(num_blocks, generator=gen, device="cuda").to(
            torch.int32).view(B, blocks_per_req)
        R = B * (k + 1)
        row_req = torch.arange(B, device="cuda", dtype=torch.int32).repeat_interleave(k + 1)
        ctx = (N - k + torch.arange(k + 1, device="cuda", dtype=torch.int32)).repeat(B)
        ranges = torch.tensor([[pre, pre + n_vis]], dtype=torch.int32, device="cuda").repeat(B, 1)
        range_start = torch.arange(B + 1, dtype=torch.int32, device="cuda")
        queries = [torch.randn(R, Hq, D, generator=gen, device="cuda", dtype=torch.bfloat16)
                   for _ in range(layers)]

        def step():
            return [paged_visual_mass(q, kc, block_table, row_req, ctx, ranges, range_start,
                                      scale) for q, kc in zip(queries, keys)]

        masses = step()  # compiles
        if B == batches[0]:  # the compiled kernel against the reference, request 0
            pos = torch.arange(N, device="cuda")
            visual = (pos >= pre) & (pos < pre + n_vis)
            want = visual_mass(queries[0][:k + 1], keys[0][block_table[0, pos // bs], pos % bs],
                               visual, ctx[:k + 1], scale)
            err = (masses[0][:k + 1] - want).abs().max().item()
            print(f"check against reference.visual_mass (batch {B}, request 0): "
                  f"max |error| {err:.1e}")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        stop.record()
        stop.synchronize()
        t_step = start.elapsed_time(stop) * 1e-3 / iters
        t_launch = t_step / layers
        io = R * Hq * D * 2 + R * Hq * 4
        read = (int(ctx.sum()) * Hkv * D * 2
                + sum(triton.cdiv(c, bs) for c in ctx.tolist()) * Hkv * 4 + io)
        unique = B * N * Hkv * D * 2 + block_table.numel() * 4 + io
        table.append(f"| {B} | {R} | {t_step * 1e6:.1f} | {t_launch * 1e6:.1f} "
                     f"| {read / 1e6:.0f} | {read / t_launch / 1e9:.0f} "
                     f"| {read / t_launch / copy_bw:.0%} | {unique / 1e6:.0f} "
                     f"| {unique / t_launch / 1e9:.0f} | {unique / t_launch / copy_bw:.0%} |")
        del keys, masses, graph
    print("\n".join(table))
    print("as read: each (row, KV head) program's key and block-table loads (L2 hits included) "
          "+ queries + outputs; unique: every key once")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="paged_visual_mass benchmark (CUDA only)")
    ap.add_argument("--bench", action="store_true",
                    help="time the kernel at Qwen2.5-VL-32B's shapes, batch 1 to 32")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return
    if not torch.cuda.is_available():
        sys.exit("paged_visual_mass --bench needs a CUDA device; none is available here.")
    bench()


if __name__ == "__main__":
    main()
