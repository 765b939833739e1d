"""Decode-attention time, dense vs block-sparse (rlcore.sparse.decode), over context and sparsity.

What is measured
    One decode step of attention: q [B, H_q, D] over a full KV cache [B, H_kv, L, D] of L =
    context tokens. The sparse path attends to n_sel = round((1-s)·blocks) key blocks per
    (row, KV head), chosen at random with the newest block always in. The best a sparse path
    can do is limit = blocks / n_sel (≈ 1/(1-s)) times faster than dense; the table reports
    speed-up = dense / sparse and speed-up / limit.
      CPU:  dense = SDPA with enable_gqa (what transformers' sdpa attention calls), sparse =
            our torch impl. Also SDPA with each KV group's query heads as query rows
            ("sdpa_grouped"), a faster dense decode on CPU, for reference.
      CUDA: dense = SDPA (flash backend for bf16) and FlashAttention's flash_attn_with_kvcache
            when flash_attn imports; sparse = our Triton kernel, plus our torch impl.
    Times are medians: CPU wall time after warm-up; CUDA events around each call with the L2
    cache flushed before it (triton.testing.do_bench's method), so the cache is read from HBM.

Output
    A table, and bench/results/sparse_decode_cpu.json or sparse_decode_<gpu>.json whose
    one-line form is the last line printed; `ratio` = speed-up / limit at s = 0.9 for the
    largest context (dense = SDPA).

    PYTHONPATH=. python bench/sparse_decode.py                 # CPU, ~1-2 minutes on 2 cores
    PYTHONPATH=. python bench/sparse_decode.py --device cuda   # Triton kernel, ~2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import machine, write_result
from rlcore.sparse.decode import block_sparse_decode

HERE = Path(__file__).resolve().parent
DEFAULTS = {  # batch, heads_q, heads_kv, head_dim, block_size, dtype
    "cpu": dict(batch=1, heads_q=8, heads_kv=2, head_dim=128, block_size=64, dtype="float32"),
    "cuda": dict(batch=4, heads_q=32, heads_kv=8, head_dim=128, block_size=64, dtype="bfloat16"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    for name in ("batch", "heads_q", "heads_kv", "head_dim", "block_size"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: per device, see DEFAULTS")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget-s", type=float, default=0.5, help="time spent measuring each entry (after warm-up)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def cpu_times_ms(fns: dict, budget_s: float) -> dict:
    """Median wall time of each fn, after 3 warm-up calls. The fns take turns, one call each
    per round, for about budget_s per fn (at least 5 rounds), so that load from elsewhere on
    a shared machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    rounds, started = 0, time.perf_counter()
    while rounds < 5 or (rounds < 1000 and time.perf_counter() - started < budget_s * len(fns)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def cuda_times_ms(fns: dict, budget_s: float) -> dict:
    """Median CUDA-event time of each fn, with a 256 MB write before each call evicting L2."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    result = {}
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        calls = max(10, min(500, int(budget_s / max(time.perf_counter() - start, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for begin, end in events:
            flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        result[name] = statistics.median(begin.elapsed_time(end) for begin, end in events)
    return result


def random_table(batch: int, heads_kv: int, blocks: int, n_sel: int, device: str) -> torch.Tensor:
    """n_sel distinct blocks per (row, KV head): the newest and n_sel - 1 others at random."""
    others = torch.rand(batch, heads_kv, blocks - 1, device=device).argsort(dim=-1)[..., : n_sel - 1]
    newest = torch.full((batch, heads_kv, 1), blocks - 1, device=device)
    return torch.cat([newest, others], dim=-1).to(torch.int32)


def flash_attn_decode():
    """FlashAttention's decode entry point, or None when flash_attn is not installed."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def dense_fns(q, k, v, args) -> dict:
    """name -> zero-argument callable for each dense baseline."""
    B, H_q, D = q.shape
    g = args.heads_q // args.heads_kv

    def sdpa(query, **kwargs):
        """SDPA; on CUDA in 16 bits pinned to the flash backend (no silent fall-back to the
        math backend), unless flash refuses these inputs, which is then said."""
        def run(pinned):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if pinned else contextlib.nullcontext():
                return F.scaled_dot_product_attention(query, k, v, **kwargs)

        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            try:
                run(True)
                return lambda: run(True)
            except RuntimeError as error:
                print(f"SDPA's flash backend refused {tuple(query.shape)} {kwargs}: {error}; timing SDPA's own choice")
        return lambda: run(False)

    fns = {
        "sdpa": sdpa(q[:, :, None], enable_gqa=True),
        "sdpa_grouped": sdpa(q.view(B, args.heads_kv, g, D)),
    }
    flash = flash_attn_decode() if args.device == "cuda" else None
    if flash is not None:
        k_bshd, v_bshd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # its layout, converted once
        fns["flash_attn"] = lambda: flash(q[:, None], k_bshd, v_bshd)
    return fns


def measure(context: int, sparsity: float, args, timer) -> dict:
    B, dtype = args.batch, getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(context)
    q = torch.randn(B, args.heads_q, args.head_dim, device=args.device, dtype=dtype, generator=gen)
    k = torch.randn(B, args.heads_kv, context, args.head_dim, device=args.device, dtype=dtype, generator=gen)
    v = torch.randn(B, args.heads_kv, context, args.head_dim, device=args.device, dtype=dtype, generator=gen)
    blocks = math.ceil(context / args.block_size)
    n_sel = max(1, round((1 - sparsity) * blocks))
    table = random_table(B, args.heads_kv, blocks, n_sel, args.device)

    def sparse(impl):
        return lambda: block_sparse_decode(q, k, v, table, context, args.block_size, impl=impl)

    row = {"context": context, "sparsity": sparsity, "selected_blocks": n_sel, "blocks": blocks, "limit": blocks / n_sel}
    fns = {**dense_fns(q, k, v, args), "torch_sparse": sparse("torch")}
    if args.device == "cuda":
        fns["triton_sparse"] = sparse("triton")
        row["triton_max_abs_err_vs_torch"] = (sparse("triton")().float() - sparse("torch")().float()).abs().max().item()
    row.update({f"{name}_ms": ms for name, ms in timer(fns, args.budget_s).items()})
    sparse_ms = row["triton_sparse_ms" if args.device == "cuda" else "torch_sparse_ms"]
    row["speedup"] = row["sdpa_ms"] / sparse_ms
    row["speedup_over_limit"] = row["speedup"] / row["limit"]
    if "flash_attn_ms" in row:
        row["speedup_vs_flash_attn"] = row["flash_attn_ms"] / sparse_ms
    return row


def print_row(row: dict) -> None:
    times = "  ".join(f"{k[:-3]} {v:8.3f}" for k, v in row.items() if k.endswith("_ms"))
    print(f"ctx {row['context']:6d}  s {row['sparsity']:.2f}  {times}  speed-up {row['speedup']:6.2f}  "
          f"limit {row['limit']:6.2f}  ratio {row['speedup_over_limit']:.2f}"
          + (f"  err {row['triton_max_abs_err_vs_torch']:.1e}" if "triton_max_abs_err_vs_torch" in row else ""), flush=True)


def main() -> None:
    args = parse_args()
    timer = cuda_times_ms if args.device == "cuda" else cpu_times_ms
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    print(f"{device_name}: batch {args.batch}, H_q {args.heads_q}, H_kv {args.heads_kv}, D {args.head_dim}, "
          f"block {args.block_size}, {args.dtype}; times in ms (median)")
    if args.device == "cuda" and flash_attn_decode() is None:
        print("flash_attn: absent (not importable), FlashAttention column skipped")
    rows = []
    for context in args.contexts:
        for sparsity in args.sparsities:
            rows.append(measure(context, sparsity, args, timer))
            print_row(rows[-1])
    headline = [r for r in rows if r["context"] == max(args.contexts) and math.isclose(r["sparsity"], 0.9)]
    result = {
        "benchmark": "sparse_decode",
        "ratio": headline[0]["speedup_over_limit"] if headline else None,
        "ratio_definition": "(dense SDPA ms / sparse ms) / (blocks / selected blocks) at s=0.9, largest context",
        "sparse_impl": "triton" if args.device == "cuda" else "torch",
        "flash_attn": "present" if args.device == "cuda" and flash_attn_decode() else "absent",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(),
        "rows": rows,
    }
    write_result(result, args.out or HERE / "results" / f"sparse_decode_{slug}.json")


if __name__ == "__main__":
    main()
