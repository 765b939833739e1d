"""Split-K block-sparse flash-decoding in Triton (SPEC §7, §8).

One program per (row b, KV head h, split s). Keys and values are read through a page table
(decode.block_sparse_decode: a contiguous cache is one page per row), with any strides, so the
same kernel reads transformers' cache and vLLM's paged one in place. The splits partition the *selected* blocks of
block_table[b, h] into runs of equal length; a program loads each of its blocks once, K and V
[bs, D], and serves the g query heads of the group together: their queries are the rows of a
[G_PAD, D] tile (g padded to at least 16 rows, tl.dot's minimum), so scores are one
[G_PAD, D] x [D, bs] dot. It keeps an online softmax (running max m, sum l, unnormalised acc,
fp32, base 2) and writes (m, l, acc) per split; a second kernel combines the splits. With a
single split the first kernel writes the normalised output itself.

Padding entries (-1) and positions >= kv_len[b] are masked in the loads (no memory traffic)
and get -inf scores; the running max starts at a finite -1e30 so a split with no valid key
ends with l = 0 and contributes nothing (all-empty rows give zeros).

Works under TRITON_INTERPRET=1 (CPU) and uses only APIs present in Triton 3.6 .. 3.9.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MIN_BLOCKS_PER_SPLIT = 4  # a split's fixed cost (loading q, writing partials) is amortised over a few blocks
WAVES = 2  # aim for about this many programs per SM
INTERPRETER_SMS = 4  # nominal SM count off CUDA (the interpreter): still exercises splitting


def num_splits(n_sel: int, programs: int, sm_count: int) -> int:
    """Splits per (row, KV head): enough programs to fill WAVES x the SMs, but at least
    MIN_BLOCKS_PER_SPLIT selected blocks per split. Decode with B·H_kv programs (e.g. 32) leaves
    most of a 132-SM GPU idle; splitting the blocks trades that for a small combine step."""
    wanted = math.ceil(WAVES * sm_count / max(programs, 1))
    return max(1, min(wanted, n_sel // MIN_BLOCKS_PER_SPLIT))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, fp32 accumulation. UPCAST: the interpreter multiplies bf16 operands as their raw
    uint16 bits (Triton 3.9), so there they go through fp32 (exact for bf16 values)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_kernel(
    Q, K, V, T, PT, KV_LEN, M_PART, L_PART, ACC_PART, O,
    stride_qb, stride_qh,
    stride_kp, stride_kh, stride_kl, stride_kd,
    stride_vp, stride_vh, stride_vl, stride_vd,
    stride_tb, stride_th, stride_tn,
    stride_ptb,
    stride_ob, stride_oh,
    n_sel, blocks_per_split, page_size, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_split = tl.num_programs(2)

    rows = tl.arange(0, G_PAD)
    row_ok = rows < G
    heads = h * G + rows
    dims = tl.arange(0, D)
    offs = tl.arange(0, BS)

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    kv_len = tl.load(KV_LEN + b)
    t_base = T + b * stride_tb + h * stride_th

    m = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    start = split * blocks_per_split
    end = tl.minimum(start + blocks_per_split, n_sel)
    for i in range(start, end):
        block = tl.load(t_base + i * stride_tn).to(tl.int64)
        block_start = block * BS  # its own name: reassigning the split's `start` would make it loop-carried
        pos = block_start + offs
        ok = (pos >= 0) & (pos < kv_len)  # a -1 (padding) block has only negative positions
        # a block lies within one page (page_size is a multiple of BS)
        page = tl.load(PT + b * stride_ptb + block_start // page_size, mask=(block >= 0) & (block_start < kv_len),
                       other=0).to(tl.int64)
        slot = block_start % page_size + offs
        k_ptrs = K + page * stride_kp + h * stride_kh + slot[:, None] * stride_kl + dims[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v_ptrs = V + page * stride_vp + h * stride_vh + slot[:, None] * stride_vl + dims[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new

    if SINGLE_SPLIT:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_ptrs = O + b * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (b * tl.num_programs(1) * G + heads) * num_split + split  # [B, H_q, S] contiguous
        tl.store(M_PART + part, m, mask=row_ok)
        tl.store(L_PART + part, l, mask=row_ok)
        tl.store(ACC_PART + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(M_PART, L_PART, ACC_PART, O, stride_ob, stride_oh, num_split,
                    H_Q: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr):
    """out[b, hq] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (0 where nothing was valid)."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, S_PAD)
    split_ok = splits < num_split
    part = (b * H_Q + hq) * num_split + splits
    m = tl.load(M_PART + part, mask=split_ok, other=-1.0e30)
    l = tl.load(L_PART + part, mask=split_ok, other=0.0)
    dims = tl.arange(0, D)
    acc = tl.load(ACC_PART + part[:, None] * D + dims[None, :], mask=split_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + b * stride_ob + hq * stride_oh + dims, out.to(O.dtype.element_ty))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def triton_block_sparse_decode(q, k_cache, v_cache, block_table, kv_len, block_size, scale, page_table,
                               splits=None) -> torch.Tensor:
    """See decode.block_sparse_decode (which checks shapes and makes the page table of a
    contiguous cache). `splits` overrides num_splits()."""
    B, H_q, D = q.shape
    H_kv = k_cache.shape[1]
    g = H_q // H_kv
    n_sel = block_table.shape[2]
    if D < 16 or D & (D - 1) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({D}) and block_size ({block_size}) must be powers of two >= 16")
    if q.stride(2) != 1:
        raise ValueError("q needs a contiguous last dimension")
    if isinstance(kv_len, int):
        kv_len = torch.full((B,), kv_len, dtype=torch.int64, device=q.device)
    kv_len, block_table, page_table = (t.to(q.device) for t in (kv_len, block_table, page_table))

    splits = splits or num_splits(n_sel, B * H_kv, _sm_count(q.device))
    per_split = max(1, math.ceil(n_sel / splits))
    splits = max(1, math.ceil(n_sel / per_split))  # no empty split
    out = torch.empty_like(q)
    parts = [torch.empty(B, H_q, splits, *extra, dtype=torch.float32, device=q.device) for extra in ((), (), (D,))]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products; ignored for 16-bit inputs
    _split_kernel[(B, H_kv, splits)](
        q, k_cache, v_cache, block_table, page_table, kv_len, *parts, out,
        q.stride(0), q.stride(1),
        *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0), block_table.stride(1), block_table.stride(2),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        n_sel, per_split, k_cache.shape[2], scale * math.log2(math.e),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=D, BS=block_size,
        PRECISION=precision, UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, SINGLE_SPLIT=splits == 1,
    )
    if splits > 1:
        _combine_kernel[(B, H_q)](*parts, out, out.stride(0), out.stride(1), splits,
                                  H_Q=H_q, D=D, S_PAD=triton.next_power_of_2(splits))
    return out
