"""Block-sparse decode attention: one query token per row attends to the key blocks a block
table selects (SPEC §7, §8).

Approach. Two implementations behind one function:
  - "torch" (the CPU path and the reference): gather the selected blocks' rows of K and V once
    per (row, KV head) with a single `index_select` on the flattened cache (through the page
    table when the cache is paged, as vLLM's is), then two batched matmuls and a masked fp32
    softmax; the g query heads of a KV group are the rows of one [g, D] x [D, n_sel·bs]
    matmul, so they share the gathered K/V (no repeat_kv).
  - "triton" (CUDA): the split-K flash-decoding kernel of triton_decode.py, which reads the
    selected blocks in place through the block table and page table (no gather copy).

Why not an existing library:
  - PyTorch flex_attention + BlockMask. `BlockMask.from_kv_blocks` takes a block table, but
    indexed by query head (GQA: our table repeated g times) and padded to every key block of
    the context, with a mask_mod over kv_len for the partial newest block; the selection
    changes every step, so the mask is rebuilt per step and layer. Flex is fast only under
    torch.compile (a C++ toolchain on CPU; shapes that change per step recompile unless
    dynamic). Measured on this CPU (torch 2.13, B=1, H_q=8, H_kv=2, D=128, 32k context, 10% of
    64-key blocks, 1 thread, machine under load): compiled flex 2.4 ms + 2.3 ms to build the
    BlockMask vs 2.5 ms for the torch path here (dense SDPA 59 ms); compiling it failed with a
    C++ error unless "full" blocks were passed (zero of them), and took 3-11 s.
  - FlashInfer and FlashAttention (`flash_attn_with_kvcache` with a block_table) decode kernels
    are CUDA-only and not installable here; their paged decode reads one page table per row
    shared by all KV heads (FlashAttention: pages of a multiple of 256 tokens), whereas
    ReSA/SeerAttention-R select blocks per KV head over transformers' contiguous cache.
A direct kernel over our [B, H_kv, n_sel] table reads the cache as it is, needs no compile
step and no per-step mask object, and lets the g heads of a group share each loaded block.
"""

from __future__ import annotations

import threading

import torch


def block_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: int | torch.Tensor,
    block_size: int,
    scale: float | None = None,
    impl: str = "auto",
    page_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H_q, D] over the selected key blocks of each row's keys and values.

    The cache is either contiguous, k_cache/v_cache [B, H_kv, L, D] (row b's position p at
    [b, :, p]), or paged like vLLM's: [P, H_kv, page, D] with `page_table` [B, pages] (row b's
    position p at [page_table[b, p // page], :, p % page]; page a multiple of block_size). Any
    strides: vLLM's CPU key cache is a dimension-major view.

    block_table [B, H_kv, n_sel] (int32/int64) lists block indices of each row's sequence,
    -1 = padding; positions >= kv_len[b] are ignored. Query head i reads KV head
    i // (H_q // H_kv). A row/head with no valid key gets zeros. Returns [B, H_q, D] in q's
    dtype; softmax and sums are fp32.
    """
    _check_shapes(q, k_cache, v_cache, block_table, page_table, block_size)
    if page_table is None:  # a contiguous cache is a paged one with one page per row
        page_table = torch.arange(q.shape[0], device=k_cache.device)[:, None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return _torch_decode(q, k_cache, v_cache, block_table, kv_len, block_size, scale, page_table)
    if impl == "triton":
        from .triton_decode import triton_block_sparse_decode

        return triton_block_sparse_decode(q, k_cache, v_cache, block_table, kv_len, block_size, scale, page_table)
    raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")


def _check_shapes(q, k_cache, v_cache, block_table, page_table, block_size) -> None:
    B, H_q, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be [B or pages, H_kv, L or page, D]")
    if k_cache.shape[3] != D or H_q % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if block_table.shape[:2] != (B, k_cache.shape[1]):
        raise ValueError(f"block_table {tuple(block_table.shape)} must be [B, H_kv, n_sel]")
    if page_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k_cache.shape)} have different batch sizes")
    elif page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table {tuple(page_table.shape)} must be [B, pages]")
    elif k_cache.shape[2] % block_size:
        raise ValueError(f"page size {k_cache.shape[2]} must be a multiple of block_size {block_size}")


def selected_positions(block_table: torch.Tensor, kv_len: int | torch.Tensor, block_size: int):
    """Sequence positions of the selected blocks, [B, H_kv, n_sel·bs], and which of them to
    ignore: those of padding entries and those at or after kv_len. Ignored positions read
    position 0 instead, a written one (so no NaN from an unwritten cache reaches the weighted
    sum; when kv_len is 0 everything is ignored and the output is zeroed anyway)."""
    offsets = torch.arange(block_size, device=block_table.device)
    pos = (block_table.to(torch.long)[..., None] * block_size + offsets).flatten(2)
    if isinstance(kv_len, torch.Tensor):
        kv_len = kv_len.to(pos.device).view(-1, 1, 1)
    ignored = (pos < 0) | (pos >= kv_len)  # padding (-1) blocks have negative positions
    return pos.masked_fill_(ignored, 0), ignored


def _gather(cache: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, slot: str) -> torch.Tensor:
    """cache[pages[b, h, n], h, offsets[b, h, n]] -> [B, H_kv, N, D]. When each position's D
    values are one contiguous row at a multiple of D (a contiguous cache, a filled prefix of a
    preallocated one, vLLM's value cache): a row copy (`_copy_runs`). Otherwise advanced indexing."""
    P, H, page, D = cache.shape
    s_p, s_h, s_l, s_d = cache.stride()
    heads = torch.arange(H, device=pages.device).view(1, H, 1)
    if s_d != 1 or s_l != D or s_h % D or s_p % D:
        return cache[pages, heads, offsets]
    return _copy_runs(cache, pages * (s_p // D) + heads * (s_h // D) + offsets, D, slot)


def _gather_key_blocks_dim_major(cache: torch.Tensor, pages: torch.Tensor, starts: torch.Tensor,
                                 block_size: int) -> torch.Tensor:
    """Keys of whole blocks from a cache whose pages store each head's keys dimension-major
    ([P, H_kv, D, page] in memory, `cache` its [P, H_kv, page, D] view; vLLM's CPU key cache):
    a block is D runs of block_size keys, copied as runs (`_copy_runs`). pages/starts
    [B, H_kv, n_sel] locate each selected block's first key. Returns [B, H_kv, n_sel·bs, D]
    fp32, a view of a [B, H_kv, D, n_sel·bs] tensor (the scores' matmul reads it contiguously).
    A block's keys past kv_len are read as stored, whatever that is: callers mask their scores
    (values must not be read this way)."""
    P, H, page, D = cache.shape
    s_p, s_h, _, s_d = cache.stride()
    B, _, n_sel = pages.shape
    heads = torch.arange(H, device=pages.device).view(1, H, 1)
    first = (pages * s_p + heads * s_h + starts)[:, :, None, :]  # [B, H, 1, n_sel] offsets of dim 0
    dims = torch.arange(D, device=pages.device).view(1, 1, D, 1) * s_d
    runs = _copy_runs(cache, (first + dims) // block_size, block_size, "k")  # [B, H, D, n_sel, bs]
    return runs.view(B, H, D, n_sel * block_size).float().transpose(2, 3)


def _copy_runs(cache: torch.Tensor, runs: torch.Tensor, width: int, slot: str) -> torch.Tensor:
    """Runs of `width` consecutive elements of cache's memory, run i at element i·width from the
    view's first element: one index_select over the memory seen as [n, width] rows (a plain
    copy per run, several times faster on CPU than advanced indexing). Returns
    [*runs.shape, width], in the per-thread scratch buffer `slot` on CPU."""
    last = sum((n - 1) * s for n, s in zip(cache.shape, cache.stride()))
    table = cache.as_strided((last // width + 1, width), (width, 1))
    out = _scratch(slot, runs.numel() * width, cache.dtype, cache.device).view(-1, width)
    return torch.index_select(table, 0, runs.flatten(), out=out).view(*runs.shape, width)


_SCRATCH = threading.local()


def _scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer reused across calls for the gathered K or V. On CPU a fresh
    multi-MB tensor each decode step is mostly page faults (glibc hands large blocks back to
    the OS on free): measured 3x slower at 32k context. On CUDA the caching allocator already
    reuses memory, so this just allocates."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # made under vLLM's inference mode, still writable outside it
            buffer = buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _torch_decode(q, k_cache, v_cache, block_table, kv_len, block_size, scale, page_table) -> torch.Tensor:
    B, H_q, D = q.shape
    H_kv, page = k_cache.shape[1], k_cache.shape[2]
    pos, ignored = selected_positions(block_table, kv_len, block_size)
    pages = page_table.to(pos.device, torch.long).gather(1, (pos // page).flatten(1)).view_as(pos)
    offsets = pos % page
    s_p, s_h, s_l, s_d = k_cache.stride()
    if s_l == 1 and s_p % block_size == s_h % block_size == s_d % block_size == 0:  # dimension-major keys
        k = _gather_key_blocks_dim_major(k_cache, pages[..., ::block_size], offsets[..., ::block_size], block_size)
    else:
        k = _gather(k_cache, pages, offsets, "k").float()
    v = _gather(v_cache, pages, offsets, "v").float()
    qg = q.view(B, H_kv, H_q // H_kv, D).float() * scale
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, H_kv, g, N]
    scores.masked_fill_(ignored[:, :, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H_kv, g, D]
    out.masked_fill_(ignored.all(dim=-1)[..., None, None], 0.0)  # no valid key: zeros, not NaN
    return out.view(B, H_q, D).to(q.dtype)
