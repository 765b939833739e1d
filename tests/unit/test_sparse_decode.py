"""Block-sparse decode attention against references built independently of it: a dense fp64
softmax under an explicit [B, H_q, L] mask made from the block table with Python loops, and
SDPA over the valid prefix when every block is selected. Paged caches are the contiguous
inputs scattered over shuffled pages laid out as vLLM's CPU build lays them out. The Triton
kernel runs under the Triton interpreter on CPU (in a subprocess, see `interpreter_results`)
and on CUDA when present."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlcore.sparse.decode import block_sparse_decode

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def make_inputs(seed, B, H_q, H_kv, D, bs, L, n_sel, dtype, kv_len=None):
    """q, a cache of capacity L whose unwritten tail (>= kv_len[b]) is NaN, per-row kv_len
    (unless given: row 0 fills the cache, the others end in a partial block), and a table of
    n_sel entries per (row, KV head): the newest block, some other distinct valid blocks and
    -1 padding, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_q, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, L, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, L, D, generator=g).to(dtype)
    if kv_len is None:
        kv_len = torch.randint(bs + 1, L + 1, (B,), generator=g)
        kv_len[kv_len % bs == 0] -= 1
        kv_len[0] = L
    for b in range(B):
        k[b, :, int(kv_len[b]):] = float("nan")
        v[b, :, int(kv_len[b]):] = float("nan")
    table = torch.full((B, H_kv, n_sel), -1, dtype=torch.int32)
    for b in range(B):
        blocks = math.ceil(int(kv_len[b]) / bs)
        for h in range(H_kv):
            count = int(torch.randint(1, min(n_sel, blocks) + 1, (1,), generator=g))
            chosen = [blocks - 1] + [int(x) for x in torch.randperm(blocks - 1, generator=g)[: count - 1]]
            row = chosen + [-1] * (n_sel - count)
            table[b, h] = torch.tensor(row)[torch.randperm(n_sel, generator=g)]
    return q, k, v, table, kv_len


def paged(k, v, page, seed, keys_dim_major):
    """The cache [B, H, L, D] scattered over shuffled pages of `page` positions, stored as vLLM's
    CPU build stores them: one [P, H, page, 2·D] buffer whose halves are keys and values, keys
    dimension-major ([D, page] per head) if asked; two spare pages and unwritten slots are NaN.
    Returns the key and value caches as logical [P, H, page, D] views and the page table."""
    B, H, L, D = k.shape
    n = math.ceil(L / page)
    P = B * n + 2
    store = torch.full((P, H, page, 2 * D), float("nan"), dtype=k.dtype)
    k_pages, v_pages = store.view(P, H, 2 * page, D).chunk(2, dim=2)
    if keys_dim_major:
        k_pages = k_pages.view(P, H, D, page).transpose(2, 3)
    page_table = torch.randperm(P, generator=torch.Generator().manual_seed(seed))[: B * n].view(B, n).to(torch.int32)
    for b in range(B):
        for i in range(n):
            length = min(page, L - i * page)
            k_pages[page_table[b, i], :, :length] = k[b, :, i * page : i * page + length]
            v_pages[page_table[b, i], :, :length] = v[b, :, i * page : i * page + length]
    return k_pages, v_pages, page_table


def dense_reference(q, k, v, table, kv_len, bs):
    """softmax(q·Kᵀ/√D) V in fp64 over an explicit mask: (row, head, position) is attended iff
    its block is in the table of the head's KV group and the position is before kv_len."""
    B, H_q, D = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    g = H_q // H_kv
    mask = torch.zeros(B, H_q, L, dtype=torch.bool)
    for b in range(B):
        for hq in range(H_q):
            for block in table[b, hq // g].tolist():
                if block >= 0:
                    mask[b, hq, block * bs:(block + 1) * bs] = True
            mask[b, hq, int(kv_len[b]):] = False
    keys = k.double().repeat_interleave(g, dim=1)
    values = torch.where(mask[..., None], v.double().repeat_interleave(g, dim=1), 0.0)
    scores = torch.einsum("bhd,bhld->bhl", q.double(), keys) / math.sqrt(D)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhl,bhld->bhd", weights, values)


# (B, H_q, H_kv, D, bs, L, n_sel): g = 1, 3, 4; block sizes 16 and 64; L past the longest row.
TORCH_CASES = [
    (2, 4, 4, 32, 16, 300, 7),
    (3, 6, 2, 64, 16, 512, 12),
    (2, 8, 2, 64, 64, 1000, 5),
    (1, 12, 4, 128, 64, 2048, 20),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_matches_dense_masked_reference(case, dtype):
    B, H_q, H_kv, D, bs, L, n_sel = case
    q, k, v, table, kv_len = make_inputs(0, *case, dtype)
    out = block_sparse_decode(q, k, v, table, kv_len, bs, impl="torch")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, table, kv_len, bs), **TOL[dtype])


def test_int64_table_int_kv_len_and_strided_cache():
    """An int64 table, a scalar kv_len and a cache that is a slice of a larger buffer (the
    advanced-indexing gather) give the same as the reference."""
    q, k, v, table, _ = make_inputs(1, 2, 8, 2, 64, 16, 256, 9, torch.float32, kv_len=torch.tensor([200, 200]))
    buffer_k = torch.randn(2, 2, 256, 2 * 64)
    buffer_v = torch.randn(2, 2, 256, 2 * 64)
    buffer_k[..., :64], buffer_v[..., :64] = k, v
    k_view, v_view = buffer_k[..., :64], buffer_v[..., :64]
    out = block_sparse_decode(q, k_view, v_view, table.long(), 200, 16, impl="torch")
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, table, [200, 200], 16), **TOL[torch.float32])


def test_cache_that_is_a_prefix_view_of_a_preallocated_buffer():
    """rlcore.sparse.generate's cache layout: the filled prefix [:, :, :L] of a [B, H, capacity, D]
    buffer (the strided index_select path), with garbage past L."""
    q, k, v, table, kv_len = make_inputs(2, 2, 8, 2, 64, 16, 200, 6, torch.float32)
    buffer_k, buffer_v = torch.full((2, 2, 320, 64), float("nan")), torch.full((2, 2, 320, 64), float("nan"))
    buffer_k[:, :, :200], buffer_v[:, :, :200] = k, v
    out = block_sparse_decode(q, buffer_k[:, :, :200], buffer_v[:, :, :200], table, kv_len, 16, impl="torch")
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, table, kv_len, 16), **TOL[torch.float32])


@pytest.mark.parametrize("keys_dim_major", [False, True], ids=["token-major", "dim-major"])
@pytest.mark.parametrize("case,page", [(TORCH_CASES[1], 32), (TORCH_CASES[2], 128), (TORCH_CASES[3], 64)])
def test_paged_cache_matches_dense_masked_reference(case, page, keys_dim_major):
    """vLLM's paged layout: the page table maps each row's positions to shuffled pages."""
    B, H_q, H_kv, D, bs, L, n_sel = case
    q, k, v, table, kv_len = make_inputs(7, *case, torch.float32)
    k_pages, v_pages, page_table = paged(k, v, page, 7, keys_dim_major)
    out = block_sparse_decode(q, k_pages, v_pages, table, kv_len, bs, impl="torch", page_table=page_table)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, table, kv_len, bs), **TOL[torch.float32])


def test_paged_cache_shape_errors():
    q, k, v, table, kv_len = make_inputs(8, 2, 4, 2, 32, 16, 64, 3, torch.float32)
    k_pages, v_pages, page_table = paged(k, v, 32, 8, False)
    with pytest.raises(ValueError, match="page_table"):
        block_sparse_decode(q, k_pages, v_pages, table, kv_len, 16, page_table=page_table[:1])
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_sparse_decode(q, k_pages, v_pages, table, kv_len, 64, page_table=page_table)


def test_nothing_selected_gives_zeros():
    q, k, v, table, kv_len = make_inputs(2, 2, 4, 2, 32, 16, 64, 3, torch.float32)
    table[0] = -1
    out = block_sparse_decode(q, k, v, table, kv_len, 16, impl="torch")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("g", [1, 4])
def test_all_blocks_equals_sdpa_over_valid_prefix(g):
    B, H_kv, D, bs, L = 3, 2, 64, 16, 400
    kv_len = torch.tensor([400, 257, 33])
    q, k, v, _, _ = make_inputs(3, B, H_kv * g, H_kv, D, bs, L, 1, torch.float32, kv_len=kv_len)
    table = torch.arange(math.ceil(L / bs), dtype=torch.int32).expand(B, H_kv, -1).contiguous()
    out = block_sparse_decode(q, k, v, table, kv_len, bs, impl="torch")
    for b in range(B):
        n = int(kv_len[b])
        expected = F.scaled_dot_product_attention(q[b, :, None], k[b, :, :n], v[b, :, :n], enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-4)


def test_auto_is_torch_on_cpu_and_bad_impl_raises():
    q, k, v, table, kv_len = make_inputs(4, 1, 4, 2, 32, 16, 64, 2, torch.float32)
    assert torch.equal(block_sparse_decode(q, k, v, table, kv_len, 16), block_sparse_decode(q, k, v, table, kv_len, 16, impl="torch"))
    with pytest.raises(ValueError):
        block_sparse_decode(q, k, v, table, kv_len, 16, impl="flex")


# Triton interpreter cases (small: the interpreter is slow): (B, H_q, H_kv, D, bs, L, n_sel), dtype, splits
# (None = the heuristic; 3 with n_sel 5 leaves the last split one block), paged: None (contiguous)
# or (page, keys dimension-major).
TRITON_CASES = [
    ((2, 4, 4, 64, 16, 200, 5), "float32", None, None),
    ((2, 6, 2, 64, 16, 160, 5), "float32", 3, None),
    ((2, 8, 2, 128, 64, 300, 4), "float32", 2, None),
    ((1, 4, 1, 64, 32, 256, 6), "bfloat16", 2, None),
    ((2, 8, 2, 64, 16, 128, 5), "bfloat16", None, None),
    ((2, 8, 2, 64, 16, 128, 5), "float16", 3, None),
    ((2, 6, 2, 64, 16, 160, 5), "float32", 2, (32, True)),
    ((2, 8, 2, 64, 16, 200, 5), "bfloat16", None, (64, False)),
]


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: each Triton case's max error against the
    dense reference (and against the torch impl), as JSON on stdout's last line."""
    from rlcore.sparse.triton_decode import triton_block_sparse_decode

    results = []
    for case, dtype_name, splits, paging in TRITON_CASES:
        dtype = getattr(torch, dtype_name)
        q, k, v, table, kv_len = make_inputs(5, *case, dtype)
        if paging is None:
            k_cache, v_cache, page_table = k, v, torch.arange(case[0])[:, None]
        else:
            k_cache, v_cache, page_table = paged(k, v, paging[0], 5, paging[1])
        out = triton_block_sparse_decode(q, k_cache, v_cache, table, kv_len, case[4], case[3] ** -0.5, page_table, splits=splits)
        ref = dense_reference(q, k, v, table, kv_len, case[4])
        close = torch.allclose(out.double(), ref, **TOL[dtype])
        results.append({"case": repr((case, dtype_name, splits, paging)), "close": close,
                        "max_err": (out.double() - ref).abs().max().item()})
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    """TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. at import, and the
    choice sticks to the module object; setting it in this process would either come too late
    (triton_decode already imported by another test) or leak into every later test that uses
    Triton. A subprocess with the variable set gets a fresh import and leaves this one untouched."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["case"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("case,dtype_name,splits,paging", TRITON_CASES)
def test_triton_interpreter_matches_dense_reference(interpreter_results, case, dtype_name, splits, paging):
    result = interpreter_results[repr((case, dtype_name, splits, paging))]
    assert result["close"], result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paging", [None, (256, False), (128, True)], ids=["contiguous", "paged", "paged-dim-major"])
def test_triton_cuda_matches_torch_impl(dtype, paging):
    B, H_q, H_kv, D, bs, L, n_sel = 4, 32, 8, 128, 64, 8192, 24
    q, k, v, table, kv_len = make_inputs(6, B, H_q, H_kv, D, bs, L, n_sel, dtype)
    k_cache, v_cache, page_table = (k, v, None) if paging is None else paged(k, v, paging[0], 6, paging[1])
    q, k_cache, v_cache, table, kv_len = (t.cuda() for t in (q, k_cache, v_cache, table, kv_len))
    page_table = None if page_table is None else page_table.cuda()
    out = block_sparse_decode(q, k_cache, v_cache, table, kv_len, bs, page_table=page_table)  # auto: Triton on CUDA
    ref = block_sparse_decode(q, k_cache, v_cache, table, kv_len, bs, impl="torch", page_table=page_table)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    dense = dense_reference(*(t.cpu() for t in (q, k, v, table, kv_len)), bs)
    torch.testing.assert_close(out.double().cpu(), dense, **TOL[dtype])


if __name__ == "__main__":
    _interpreter_main()
