"""RPT data (SPEC §5): next-token reasoning prompts cut from real text, bucketed by a proxy model's entropy.

    python -m rlcore.rpt                      # → data/rpt/{train,eval,sft}.jsonl (~100 s of CPU time)
    rlcore sft recipe=sft_rpt                 # the format cold start
    rlcore train recipe=rpt_nexttoken         # reads them (configs/data/rpt.yaml, data.source=hf)

Corpus: the Python Language Reference as CPython ships it (`pydoc_data.topics`, the text
behind `help("assignment")`, PSF licence): ~560 paragraphs of real English prose in every
Python install, so it needs no network, no download and no extra package. It is technical
prose with a little non-ASCII (curly quotes), which exercises the byte-level reward. Code
and grammar blocks (indented) and headings are left out. The text is that of the running
Python's version: a given seed gives the same rows on the same Python minor version.

Cut positions: each paragraph (first MAX_TOKENS tokens, after at least MIN_CONTEXT) is cut
before a token of the proxy's tokenizer. Cuts inside a UTF-8 character, before a
whitespace-only token and where none of the proxy's top TOP_K tokens could be boxed are skipped. The proxy (any HF causal LM; default the policy,
SmolLM2-135M) scores every position of a paragraph in one forward pass, paragraphs batched.

Entropy: of the proxy's next-token distribution restricted to its top 16 tokens and
renormalised over them (nats, 0..ln 16 ≈ 2.77): a proper entropy, insensitive to the long
tail of the vocabulary. Buckets: easy [0.5, 1.0), medium [1.0, 1.5), hard ≥ 1.5; positions
below 0.5 are dropped. Each split gets the same number of positions per bucket, at most one
per bucket per paragraph; held-out positions come from topics the training split never sees.
The cold start's positions (sft.jsonl) come from the training topics but are never training
positions (build).

Rows are {question, answer, metadata}, what data.source=hf loads: the question is the
context and the instruction; the answer is the next token's text (up to the first whole
character, for a token that ends inside one); metadata carries the truth for the reward
(rewards/rpt.py) — `continuation` (the next NEXT_TOKENS tokens' text) and `boundaries`
(their cumulative UTF-8 byte lengths) — and `bucket`, by which evaluation reports accuracy
(`eval/accuracy/<bucket>`). `proxy_top` holds the proxy's CANDIDATES likeliest next tokens, as
they continue the text: the format cold start (`rlcore sft recipe=sft_rpt`, cold_start_completion)
demonstrates the first; bench/rpt_nexttoken.py reports how often the first, and any, is right.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

BUCKETS = (("hard", 1.5), ("medium", 1.0), ("easy", 0.5))  # lower entropy bound of each, highest first
TOP_K = 16
MIN_CONTEXT = 16
MAX_TOKENS = 128  # context ≤ 127 tokens: with the instruction and chat template, within data.max_prompt_tokens=256
NEXT_TOKENS = 8  # a prediction may span up to this many tokens
CANDIDATES = 3  # the proxy's likeliest next tokens kept per row (metadata.proxy_top)
TAIL_WORDS = 8  # the cold start's reasoning copies this many last words of the text

PROMPT = (
    "Here is the beginning of a text, cut off at some point:\n\n{context}\n\n"
    "What is the next token: the next word, part of a word, or punctuation mark? "
    "Think it over inside <think> </think>, then write the next token in \\boxed{{}} after </think>, "
    "e.g. <think>...</think> \\boxed{{word}}. Leading spaces are ignored."
)


def corpus() -> dict[str, list[str]]:
    """topic → its prose paragraphs (lines joined, whitespace collapsed), from pydoc_data.topics."""
    from pydoc_data.topics import topics

    out = {}
    for name, text in topics.items():
        paragraphs = []
        for block in re.split(r"\n\s*\n", text):
            lines = block.split("\n")
            if lines[0].startswith(" ") or any(set(line.strip()) <= set("*=-~") for line in lines):
                continue  # code or grammar (indented), or a heading (underlined)
            words = block.split()
            if len(words) >= 24 and sum(w.isalpha() for w in words) >= len(words) / 2:  # prose, not a list of names
                paragraphs.append(" ".join(words))
        if paragraphs:
            out[name] = paragraphs
    return out


def top_k_entropy(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Entropy (nats) of softmax over the k largest logits, per position: [..., V] → [...]."""
    return softmax_entropy(logits.topk(k, dim=-1).values)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bucket_of(entropy: float) -> str | None:
    return next((name for name, low in BUCKETS if entropy >= low), None)


@torch.inference_mode()
def next_token_predictions(model, batch: list[list[int]]) -> list[tuple[list[float], list[list[int]]]]:
    """For each sequence, the proxy's prediction of token t from tokens[:t] (t ≥ 1; [0] is nan / []):
    (entropy[t], the ids of its TOP_K likeliest tokens[t], likeliest first)."""
    width = max(map(len, batch))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
    logits = model(input_ids=ids, attention_mask=mask).logits
    top = logits.topk(TOP_K, dim=-1)  # the entropy's support and the candidates, in one pass
    entropy = softmax_entropy(top.values)
    top = top.indices
    return [([float("nan")] + entropy[i, : len(s) - 1].tolist(), [[]] + top[i, : len(s) - 1].tolist())
            for i, s in enumerate(batch)]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def cut(tokenizer, ids: list[int], t: int) -> dict | None:
    """The row for a cut before token t (question, answer, the reward's truth), or None where it is unusable."""
    context = decode(tokenizer, ids[:t])
    if context.endswith("\ufffd"):  # inside a character
        return None
    continuation, boundaries = "", []
    for end in range(t + 1, min(t + NEXT_TOKENS, len(ids)) + 1):
        text = decode(tokenizer, ids[t:end])
        if not text.endswith("\ufffd"):  # a boundary inside a character is out of any prediction's reach
            continuation, boundaries = text, boundaries + [len(text.encode())]
    if not boundaries:
        return None
    answer = continuation.encode()[: boundaries[0]].decode()
    if not answer.strip():
        return None
    return {
        "question": PROMPT.format(context=context),
        "answer": answer,
        "metadata": {"continuation": continuation, "boundaries": boundaries},
    }


def proxy_candidates(tokenizer, top_ids: list[int], n: int = CANDIDATES) -> list[str]:
    """The proxy's n likeliest next tokens that can stand in a \\boxed{}, likeliest first, each as the
    text continues (leading space kept): not special, whole characters, not blank, no braces or
    backslash, and one per word (" the" and "the" are one: the reward ignores leading spaces)."""
    special = set(tokenizer.all_special_ids)
    texts = (decode(tokenizer, [i]) for i in top_ids if i not in special)
    usable = (t for t in texts if t.strip() and "\ufffd" not in t and not set(t) & set("{}\\"))
    by_word: dict[str, str] = {}
    for text in usable:
        by_word.setdefault(text.lstrip(), text)  # the likelier spelling
    return list(by_word.values())[:n]


def context_of(question: str) -> str:
    """The text a PROMPT question was built around."""
    head, tail = (part.format() for part in PROMPT.split("{context}"))
    return question[len(head) : len(question) - len(tail)]


def cold_start_completion(prompt) -> str:
    """`rlcore sft recipe=sft_rpt`'s demonstration: the text's last TAIL_WORDS words copied into the
    reasoning and continued with the proxy's likeliest next token a, which is then boxed:
    `<think>…the last words of the text a</think> \\boxed{a}`, a = metadata["proxy_top"][0].

    It teaches the format, not the answers: a is the proxy's guess (the policy's own, when the
    proxy is the policy), right or wrong. The guess continues the copied words directly, as the
    token after them in a forward pass over the raw text: the model's ordinary next-token
    prediction makes the guess, and RL's sampling there proposes the alternatives. (Earlier
    versions lost that ability: without the copy, the 135M model wrote the same frequent words
    whatever the text; with the guess after an arrow and a list of the three likeliest tokens,
    held-out accuracy after the cold start was 27% where the raw-text prediction gets 49%.)"""
    top = prompt.metadata.get("proxy_top")
    if not top:
        raise ValueError("sft.completion_fn=rlcore.rpt:cold_start_completion needs rows with metadata.proxy_top: "
                         "rebuild the data with `python -m rlcore.rpt`")
    tail = " ".join(context_of(prompt.text).split(" ")[-TAIL_WORDS:])
    return f"<think>…{tail}{top[0]}</think> \\boxed{{{top[0].lstrip()}}}"


def candidates(entropies: list[float]) -> dict[str, list[int]]:
    """bucket → the cut positions t (MIN_CONTEXT ≤ t < len) whose next-token entropy falls in it."""
    out: dict[str, list[int]] = {}
    for t in range(MIN_CONTEXT, len(entropies)):
        bucket = bucket_of(entropies[t])
        if bucket:
            out.setdefault(bucket, []).append(t)
    return out


def scored_paragraphs(model, tokenizer, paragraphs, batch_size: int) -> Iterator[tuple[str, list[int], list[float], list[list[int]]]]:
    """(topic, token ids, entropies, top ids) per paragraph; the proxy runs one batch at a time, as they are consumed."""
    for start in range(0, len(paragraphs), batch_size):
        chunk = paragraphs[start : start + batch_size]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS] for _, text in chunk]
        for (topic, _), seq, (entropy, top) in zip(chunk, ids, next_token_predictions(model, ids)):
            yield topic, seq, entropy, top


def split_topics(topics: dict[str, list[str]], sizes: dict[str, int], rng: random.Random) -> dict[str, list[str]]:
    """split → its topics: shuffled topics go to eval until it holds its share of the paragraphs, the rest to train."""
    order = sorted(topics)
    rng.shuffle(order)
    share = sizes["eval"] / (sizes["eval"] + sizes["train"]) * sum(map(len, topics.values()))
    n = taken = 0
    while n < len(order) and taken < share:
        taken += len(topics[order[n]])
        n += 1
    return {"eval": order[:n], "train": order[n:]}


def interleave(topics: dict[str, list[str]], names: list[str]) -> list[tuple[str, str]]:
    """(topic, paragraph), round-robin over the topics: the first paragraph of each, then the second, …"""
    longest = max((len(topics[name]) for name in names), default=0)
    return [(name, topics[name][i]) for i in range(longest) for name in names if i < len(topics[name])]


def usable_cuts(tokenizer, ids: list[int], top: list[list[int]], positions: list[int]) -> Iterator[tuple[int, dict, list[str]]]:
    """(t, row, the proxy's boxable candidates) for each of the positions, in order, that makes a row."""
    for t in positions:
        row, guesses = cut(tokenizer, ids, t), proxy_candidates(tokenizer, top[t])
        if row and guesses:
            yield t, row, guesses


def build(model, tokenizer, sizes: dict[str, int], seed: int, batch_size: int = 16) -> dict[str, list[dict]]:
    """split → rows: sizes[split] positions (fewer if its topics run out), spread evenly over the buckets,
    at most one per bucket per paragraph and split.

    The optional `sft` split (sizes["sft"]) holds the format cold start's demonstrations. It comes
    from the training topics, at other positions than the train split's (the same paragraphs, other
    cuts), so RL's training positions are as new to the cold-started policy as the held-out ones: a
    cold start on the train split itself learns its answers by heart (48% on its training positions,
    29% held out). The train and eval rows are the same with or without it."""
    rng = random.Random(seed)
    topics = corpus()
    rows: dict[str, list[dict]] = {}
    for group, names in split_topics(topics, sizes, rng).items():
        splits = [group] + (["sft"] if group == "train" and sizes.get("sft") else [])
        quota = {split: {b: sizes[split] // len(BUCKETS) + (i < sizes[split] % len(BUCKETS)) for i, (b, _) in enumerate(BUCKETS)}
                 for split in splits}
        rows |= {split: [] for split in splits}
        for topic, ids, entropies, top in scored_paragraphs(model, tokenizer, interleave(topics, names), batch_size):
            for bucket, positions in candidates(entropies).items():
                rng.shuffle(positions)
                cuts = usable_cuts(tokenizer, ids, top, positions)
                for split in splits:
                    if quota[split][bucket] and (found := next(cuts, None)):
                        t, row, guesses = found
                        row["metadata"] |= {"bucket": bucket, "entropy": round(entropies[t], 4), "topic": topic, "position": t,
                                            "proxy_top": guesses}
                        rows[split].append(row)
                        quota[split][bucket] -= 1
            if not any(n for q in quota.values() for n in q.values()):
                break
    return rows


def main(argv: list[str] | None = None) -> None:
    from rlcore.config import ConfigError
    from rlcore.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m rlcore.rpt", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/rpt", help="directory for train.jsonl, eval.jsonl and sft.jsonl (default: data/rpt)")
    parser.add_argument("--proxy", default="zoo:smollm2-135m-instruct", help="entropy model: HF directory, hub id, zoo:NAME or embedded:NAME")
    parser.add_argument("--train", type=int, default=300, help="training positions (default: 300)")
    parser.add_argument("--eval", type=int, default=150, help="held-out positions (default: 150)")
    parser.add_argument("--sft", type=int, default=960,
                        help="cold-start positions from the training topics, none of them a training position (default: 960; 0: no sft.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="paragraphs per proxy forward pass (default: 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="proxy dtype (default: bfloat16, as configs/model/smollm2_135m.yaml; ~2x faster on CPUs with bf16)")
    args = parser.parse_args(argv)
    for name in ("train", "eval", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if args.sft < 0:
        parser.error(f"--sft={args.sft} must be >= 0")
    started = time.time()
    try:
        tokenizer, model = load_tokenizer(args.proxy), load_model(args.proxy, args.dtype).eval()
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {str(e).replace('model.path', '--proxy')}\n")
    sizes = {"train": args.train, "eval": args.eval, "sft": args.sft}
    rows = build(model, tokenizer, sizes, args.seed, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in rows:
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
        counts = Counter(r["metadata"]["bucket"] for r in rows[split])
        short = f"; the corpus ran out before {sizes[split]}" if len(rows[split]) < sizes[split] else ""
        print(f"{path}: {len(rows[split])} positions ({', '.join(f'{b} {counts[b]}' for b, _ in reversed(BUCKETS))}){short}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
