"""Selection over a paged KV cache (rlcore.sparse.paged) against the contiguous path: summaries
kept per page while requests write in chunks and pages are reused equal the summaries of each
request's own keys; a batch of rows of different lengths selects and attends as each row would
alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from rlcore.sparse.decode import block_sparse_decode
from rlcore.sparse.paged import PagedSummaries, sparse_decode_rows, token_positions
from rlcore.sparse.resa import ReSASelector
from rlcore.sparse.seer import SeerSelector, build_gates, rotary_embedding

H_Q, H_KV, D, BS, PAGE = 4, 2, 16, 4, 8


def seer(threshold=None, budget=None):
    config = LlamaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=H_Q,
                         num_key_value_heads=H_KV, head_dim=D, intermediate_size=128)
    torch.manual_seed(0)
    return SeerSelector(build_gates(config, block_size=BS, d_gate=16), rotary_embedding(config),
                        budget_blocks=budget, threshold=threshold)


SELECTORS = {
    "resa": lambda: ReSASelector(BS, keep_ratio=0.4, min_blocks=2),
    "seer-budget": lambda: seer(budget=3),
    "seer-threshold": lambda: seer(threshold=0.1),
}


def test_token_positions_match_a_loop():
    query_start_loc = torch.tensor([0, 1, 6, 7, 10])  # decode, 5-token chunk, decode, 3-token chunk
    seq_lens = torch.tensor([9, 5, 30, 12])
    expected = [p for r in range(4) for p in range(int(seq_lens[r]) - int(query_start_loc[r + 1] - query_start_loc[r]), int(seq_lens[r]))]
    assert token_positions(query_start_loc, seq_lens).tolist() == expected


class PagedCache:
    """A tiny stand-in for vLLM's paged cache: requests write their keys a chunk at a time into
    pages from a free list; a finished request's pages go back to the front of the list."""

    def __init__(self, pages: int, selector):
        self.keys = torch.full((pages, H_KV, PAGE, D), float("nan"))
        self.free = torch.randperm(pages, generator=torch.Generator().manual_seed(0)).tolist()
        self.pages: dict[str, list[int]] = {}
        self.summaries = PagedSummaries(selector, layer_idx=0)

    def write(self, writes: dict[str, torch.Tensor], lengths: dict[str, int]) -> None:
        """One forward: writes[name] = the request's next keys [H_kv, n, D] after lengths[name] written."""
        slots, positions = [], []
        for name, keys in writes.items():
            for i in range(keys.shape[1]):
                position = lengths[name] + i
                if position % PAGE == 0:
                    self.pages.setdefault(name, []).append(self.free.pop(0))
                page = self.pages[name][position // PAGE]
                self.keys[page, :, position % PAGE] = keys[:, i]
                slots.append(page * PAGE + position % PAGE)
                positions.append(position)
        self.summaries.update(self.keys, torch.tensor(slots), torch.tensor(positions))

    def release(self, name: str) -> None:
        self.free[:0] = self.pages.pop(name)


def page_table(cache: PagedCache, names: list[str]) -> torch.Tensor:
    width = max(len(cache.pages[n]) for n in names) + 1  # one spare column, like vLLM's padded rows
    return torch.tensor([cache.pages[n] + [0] * (width - len(cache.pages[n])) for n in names], dtype=torch.int32)


@pytest.mark.parametrize("method", SELECTORS)
def test_summaries_per_page_equal_each_requests_own(method):
    """Three requests, chunked prefill next to decode steps, one request finishing and its pages
    going to a new request: what `gather` returns for each row's complete blocks is what the
    selector makes from that row's keys alone."""
    selector = SELECTORS[method]()
    g = torch.Generator().manual_seed(1)
    full = {name: torch.randn(H_KV, 40, D, generator=g) for name in ("a", "b", "c")}
    cache, lengths = PagedCache(pages=12, selector=selector), {"a": 0, "b": 0}
    plan = [{"a": 7, "b": 3}, {"a": 6, "b": 1}, {"a": 1, "b": 9}, {"a": 1, "b": 1}]
    for step in plan:
        cache.write({n: full[n][:, lengths[n] : lengths[n] + k] for n, k in step.items()}, lengths)
        lengths.update({n: lengths[n] + k for n, k in step.items()})
    cache.release("a")  # its pages, with their summaries, go to "c"
    lengths["c"] = 0
    for step in [{"c": 5, "b": 1}, {"c": 1, "b": 1}, {"c": 3, "b": 1}]:
        cache.write({n: full[n][:, lengths[n] : lengths[n] + k] for n, k in step.items()}, lengths)
        lengths.update({n: lengths[n] + k for n, k in step.items()})
    names = ["b", "c"]
    kv_len = torch.tensor([lengths[n] for n in names])
    got = cache.summaries.gather(page_table(cache, names), kv_len, int(kv_len.max()))
    for row, name in enumerate(names):
        own = selector.block_summaries(0, full[name][None], lengths[name])[0]
        complete = lengths[name] // BS
        torch.testing.assert_close(got[row, :, :complete], own)


def blocks(entries: torch.Tensor) -> list[int]:
    return [x for x in entries.tolist() if x >= 0]


@pytest.mark.parametrize("method", SELECTORS)
def test_a_batch_of_rows_selects_and_attends_as_each_row_alone(method):
    """Decode rows of different lengths in one call = each row through the contiguous path
    (`select` with a fresh selector, `block_sparse_decode`): same blocks, same output."""
    selector = SELECTORS[method]()
    g = torch.Generator().manual_seed(2)
    lengths = {"a": 3, "b": 17, "c": 40, "d": 24}  # no complete block; partial; …; a just-filled block
    keys = {n: torch.randn(H_KV, k, D, generator=g) for n, k in lengths.items()}
    values = {n: torch.randn(H_KV, k, D, generator=g) for n, k in lengths.items()}
    cache = PagedCache(pages=16, selector=selector)
    cache.write(keys, dict.fromkeys(lengths, 0))
    value_pages = torch.full_like(cache.keys, float("nan"))
    for n, pages in cache.pages.items():
        for i, page in enumerate(pages):
            chunk = values[n][:, i * PAGE : (i + 1) * PAGE]
            value_pages[page, :, : chunk.shape[1]] = chunk
    names = list(lengths)
    query = torch.randn(len(names), H_Q, D, generator=g)
    kv_len = torch.tensor([lengths[n] for n in names])
    out, table = sparse_decode_rows(cache.summaries, query, cache.keys, value_pages, page_table(cache, names),
                                    kv_len, int(kv_len.max()), D**-0.5)
    assert (table < 0).any()  # rows keeping fewer blocks than others are padded
    for row, name in enumerate(names):
        alone = SELECTORS[method]().select(0, query[row : row + 1], keys[name][None], lengths[name])
        for head in range(H_KV):
            assert blocks(table[row, head]) == blocks(alone[0, head])
        expected = block_sparse_decode(query[row : row + 1], keys[name][None], values[name][None], alone, lengths[name], BS)
        torch.testing.assert_close(out[row : row + 1], expected)
