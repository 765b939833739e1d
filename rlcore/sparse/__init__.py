"""Sparse-attention decoding for rollouts: SeerAttention-R learned gates and ReSA rectified
block-sparse decoding (SPEC §7, §8).

Layout (one job each):
  decode.py         block-sparse decode attention: the vectorised PyTorch reference (CPU path)
                    and the dispatcher that picks the Triton kernel on CUDA
  triton_decode.py  the Triton split-K block-sparse decode kernel (GPUs; TRITON_INTERPRET=1 on CPU)
  resa.py           ReSA block selection from per-block key min/max summaries
  seer.py           SeerAttention-R AttnGate, its distillation targets/loss, gate selection
  distill.py        gate training by self-distillation (`rlcore sft recipe=seer_gate_distill`)
  attention.py      plugs a selector into a transformers model as an attention implementation
  generate.py       the sparse rollout decode loop (ReSA rectification every f tokens)

Conventions shared by all of them:
  - KV cache layout is transformers': key/value [B, H_kv, L, D]; query head i reads KV head
    i // g (g = H_q / H_kv), as transformers' repeat_kv.
  - Key block j covers cache positions [j·bs, (j+1)·bs); the last one may be partial.
  - A block table is int32 [B, H_kv, n_sel]: selected block indices per (row, KV head),
    padded with -1 where a row/head selects fewer.
"""
