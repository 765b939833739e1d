"""Mixture-of-experts models for RSPO: upcycling a dense model, the routing the learner reads,
and the one-line error for a model without routers."""

import pytest
import torch

from rlcore.batch import Trajectory, build_batch
from rlcore.config import ConfigError
from rlcore.data import Prompt
from rlcore.model_zoo import fetch
from rlcore.models import check_routers, load_model, load_tokenizer, resolve_model_path, response_logprobs, \
    response_logprobs_with_routers


def logits_of(path, ids):
    with torch.no_grad():
        return load_model(path).eval()(input_ids=ids).logits


def test_an_upcycled_model_computes_what_the_dense_one_does(tiny_model, tiny_moe):
    ids = torch.randint(3, load_tokenizer(tiny_model).vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(tiny_moe, ids), logits_of(tiny_model, ids), atol=1e-5, rtol=0)
    moe = load_model(tiny_moe)
    assert (moe.config.model_type, moe.config.num_local_experts, moe.config.num_experts_per_tok) == ("mixtral", 4, 2)


def test_the_zoo_arith_moe_is_the_embedded_model_upcycled(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCORE_CACHE", str(tmp_path))
    path = str(fetch("arith-moe"))
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(path, ids), logits_of(resolve_model_path("embedded:arith-3m"), ids), atol=1e-5, rtol=0)
    assert load_model(path).config.num_local_experts == 8


def test_router_logprobs_are_those_of_the_position_before_each_response_token(tiny_moe):
    """Left-padded rows in one batch: row b's router log-probs for response token t are the
    router's log-softmax at the position that predicts it, as an unpadded forward of the row alone gives."""
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 100, (p,), generator=g).tolist(), torch.randint(3, 100, (r,), generator=g).tolist())
            for p, r in [(5, 4), (2, 6), (7, 1)]]
    batch = build_batch([Trajectory(Prompt("", "", "", token_ids=p), r, [0.0] * len(r), "", "stop") for p, r in rows], pad_id=0)
    model = load_model(tiny_moe).eval()
    with torch.no_grad():
        logp, _, router_logp = response_logprobs_with_routers(model, batch, 1.0)
        torch.testing.assert_close(logp, response_logprobs(model, batch, 1.0)[0])
        assert router_logp.shape == (3, 6, 2, 4)  # [B, R, MoE layers, experts]
        for b, (prompt, response) in enumerate(rows):
            alone = model(input_ids=torch.tensor([prompt + response]), output_router_logits=True)
            for t in range(len(response)):
                position = len(prompt) + t - 1
                want = torch.stack([layer[position] for layer in alone.router_logits]).log_softmax(-1)
                torch.testing.assert_close(router_logp[b, t], want, atol=1e-5, rtol=0)


def test_a_dense_model_has_no_routers_one_line(tiny_model, tiny_moe):
    check_routers(tiny_moe, "algorithm.router_shift=true")
    with pytest.raises(ConfigError, match=r"^algorithm.router_shift=true: needs a mixture-of-experts model; .* is a llama "
                                          r"model without routers; try model=arith_moe$"):
        check_routers(tiny_model, "algorithm.router_shift=true")
