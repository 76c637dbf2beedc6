"""Routing traces, locality statistics and prefetch recall, on hand-made traces and on random
Mixtral checkpoints written with save_pretrained (plain transformers and the offloaded model)."""
from __future__ import annotations

from math import comb

import pytest
import torch
from transformers import MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint
from moe_colab import RoutingTrace, record_routing
from moe_colab.analysis.locality import (category_expert_counts, chance_reuse, classify_piece, expert_load,
                                reuse_probability, token_categories)
from moe_colab.analysis.prefetch_recall import guess_experts, prefetch_recall


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("routing") / "m", layers=4, experts=8, top_k=2, seed=5)


@pytest.fixture(scope="module")
def model(ckpt):
    return MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def ids_of(n, seed=0, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# -- RoutingTrace ---------------------------------------------------------------------------------
def test_trace_validates_its_input():
    with pytest.raises(ValueError, match="3-D"):
        RoutingTrace(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        RoutingTrace(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="same expert twice"):
        RoutingTrace(torch.tensor([[[0, 1], [2, 2]]]))
    with pytest.raises(ValueError, match="out of range"):
        RoutingTrace(torch.tensor([[[0, 4]]]), num_experts=4)
    with pytest.raises(ValueError, match=">= 0"):
        RoutingTrace(torch.tensor([[[0, -1]]]), num_experts=4)
    with pytest.raises(ValueError, match="weights shape"):
        RoutingTrace(torch.tensor([[[0, 1]]]), torch.ones(1, 1, 3))
    with pytest.raises(TypeError, match="floating"):
        RoutingTrace(torch.tensor([[[0, 1]]]), torch.ones(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids"):
        RoutingTrace(torch.tensor([[[0, 1]]]), token_ids=[1, 2])
    t = RoutingTrace([[[0, 3], [1, 2]], [[2, 1], [0, 3]]])
    assert (t.num_layers, t.num_tokens, t.top_k, t.num_experts) == (2, 2, 2, 4)


def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(3 * 5)]).reshape(3, 5, 2)
    t = RoutingTrace(experts, torch.rand(3, 5, 2, generator=g), num_experts=10,
                     token_ids=torch.arange(5), tokens=["a", "▁b", "(", "\n", "ü"])
    t.save(tmp_path / "t.safetensors")
    u = RoutingTrace.load(tmp_path / "t.safetensors")
    assert torch.equal(u.experts, t.experts) and torch.equal(u.weights, t.weights)
    assert torch.equal(u.token_ids, t.token_ids) and u.tokens == t.tokens and u.num_experts == 10
    bare = RoutingTrace(experts, num_experts=8)
    bare.save(tmp_path / "b.safetensors")
    b = RoutingTrace.load(tmp_path / "b.safetensors")
    assert b.weights is None and b.tokens is None and torch.equal(b.experts, experts)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a moe_colab RoutingTrace"):
        RoutingTrace.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        RoutingTrace.load(tmp_path / "absent.safetensors")


def test_cat_joins_tokens():
    a = RoutingTrace([[[0, 1]], [[1, 2]]], num_experts=3, token_ids=[7])
    b = RoutingTrace([[[2, 0], [1, 0]], [[0, 1], [2, 1]]], num_experts=3, token_ids=[8, 9])
    c = RoutingTrace.cat([a, b])
    assert c.num_tokens == 3 and c.token_ids.tolist() == [7, 8, 9]
    assert c.experts[1].tolist() == [[1, 2], [0, 1], [2, 1]]
    with pytest.raises(ValueError, match="must match"):
        RoutingTrace.cat([a, RoutingTrace([[[0, 1]]], num_experts=3)])


# -- recording ------------------------------------------------------------------------------------
def hook_counts(model):
    return [(len(l.mlp.gate._forward_hooks), len(l.post_attention_layernorm._forward_pre_hooks),
             len(l._forward_hooks)) for l in model.model.layers]


def test_record_matches_the_models_router_logits(model):
    ids = ids_of(20)
    before = hook_counts(model)
    trace = record_routing(model, ids)
    assert hook_counts(model) == before
    assert trace.experts.shape == (4, 20, 2) and trace.num_experts == 8
    assert trace.token_ids.tolist() == ids[0].tolist()
    logits = model(ids, output_router_logits=True).router_logits          # L x [T, E]
    for l, lg in enumerate(logits):
        probs = torch.softmax(lg.float(), -1)
        w, i = probs.topk(2, dim=-1)
        assert torch.equal(trace.experts[l], i)
        torch.testing.assert_close(trace.weights[l], w / w.sum(-1, keepdim=True))


def test_recording_generate_covers_prompt_and_generated_tokens(model):
    ids = ids_of(6, seed=1)
    trace = record_routing(model, ids, max_new_tokens=7, generate_kwargs={"pad_token_id": 0, "min_new_tokens": 7})
    assert trace.num_tokens == 13 and trace.token_ids[:6].tolist() == ids[0].tolist()
    # Decoding token by token with a KV cache routes like one forward over the whole sequence.
    full = record_routing(model, trace.token_ids)
    assert torch.equal(trace.experts, full.experts)
    torch.testing.assert_close(trace.weights, full.weights, atol=1e-5, rtol=1e-4)


def test_record_refuses_batches_and_removes_hooks_on_error(model):
    before = hook_counts(model)
    with pytest.raises(ValueError, match="batch 1"):
        record_routing(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        record_routing(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(IndexError):
        record_routing(model, torch.tensor([[1, 10_000]]))                  # outside the vocabulary
    with pytest.raises(IndexError):
        prefetch_recall(model, torch.tensor([[1, 10_000]]))
    assert hook_counts(model) == before


@pytest.mark.parametrize("guess_from", ["before", "after"])
def test_offloaded_model_records_the_same_trace(ckpt, model, guess_from):
    off = moe_colab.load_model(ckpt, device="cpu", dtype=torch.float32, experts_on_device=3,
                               prefetch=2, guess_from=guess_from, progress=False)
    ids = ids_of(16, seed=2)
    a, b = record_routing(model, ids), record_routing(off, ids)
    assert torch.equal(a.experts, b.experts)
    torch.testing.assert_close(a.weights, b.weights)
    # The engine's own guesses call the next layer's norm; the recall measurement must not care.
    ra, rb = (prefetch_recall(m, ids, ahead=(1, 2), source="before")["recall"] for m in (model, off))
    torch.testing.assert_close(ra, rb)


# -- locality -------------------------------------------------------------------------------------
HAND = RoutingTrace([[[0, 1], [1, 2], [2, 3], [0, 1]]], num_experts=4)


def test_reuse_probability_by_hand():
    # d=1: {01,12} share 1, {12,23} share 1, {23,01} share 0 -> any 2/3, fraction (1+1+0)/3/2
    # d=2: {01,23} 0, {12,01} 1 -> any 1/2, fraction 1/4;  d=3: {01,01} 2 -> any 1, fraction 1
    any_ = reuse_probability(HAND, 4)
    frac = reuse_probability(HAND, 4, kind="fraction")
    torch.testing.assert_close(any_[0, :3], torch.tensor([2 / 3, 1 / 2, 1.0]))
    torch.testing.assert_close(frac[0, :3], torch.tensor([1 / 3, 1 / 4, 1.0]))
    assert torch.isnan(any_[0, 3])                                       # no pair 4 tokens apart


def test_chance_level_is_exact():
    assert chance_reuse(4, 2) == pytest.approx(5 / 6)                    # 1 - C(2,2)/C(4,2)
    assert chance_reuse(8, 2) == pytest.approx(1 - comb(6, 2) / comb(8, 2))
    assert chance_reuse(8, 2, "fraction") == 0.25
    assert chance_reuse(8, 5) == 1.0                                     # two 5-subsets of 8 always meet
    g = torch.Generator().manual_seed(0)
    for E, k in [(8, 2), (6, 1), (5, 3)]:
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(20000)])[None]
        measured = reuse_probability(RoutingTrace(experts, num_experts=E), 3)
        assert (measured - chance_reuse(E, k)).abs().max() < 0.02, (E, k)
    with pytest.raises(ValueError, match="kind"):
        chance_reuse(8, 2, "some")


def test_expert_load_by_hand():
    # uses: expert 0 twice, 1 three times, 2 twice, 3 once, of 8
    torch.testing.assert_close(expert_load(HAND), torch.tensor([[0.25, 0.375, 0.25, 0.125]]))


def test_token_categories_follow_python_syntax():
    text = "def f(x):\n    return 1  # hi\n"
    pieces = ["def", " f", "(", "x", "):", "\n", "    ", "return", " 1", "  #", " hi", "\n"]
    offsets, pos = [], 0
    for p in pieces:
        offsets.append((pos, pos + len(p)))
        pos += len(p)
    assert "".join(pieces) == text
    assert token_categories(text, offsets) == [
        "keyword", "identifier", "punctuation", "identifier", "punctuation", "whitespace",
        "whitespace", "keyword", "number", "comment", "comment", "whitespace"]
    assert [classify_piece(p) for p in ["▁def", "Ġfoo", "123", "'a", "((", "▁", "Ċ"]] == [
        "keyword", "identifier", "number", "string", "punctuation", "whitespace", "whitespace"]


def test_category_expert_counts_by_hand():
    table = category_expert_counts(HAND, ["keyword", "identifier", "keyword", "whitespace"])
    assert table.shape == (1, 8, 4)
    names = moe_colab.analysis.locality.CATEGORIES
    assert table[0, names.index("keyword")].tolist() == [1, 1, 1, 1]     # tokens {0,1} and {2,3}
    assert table[0, names.index("identifier")].tolist() == [0, 1, 1, 0]
    assert table[0, names.index("whitespace")].tolist() == [1, 1, 0, 0]
    assert table.sum() == 8
    with pytest.raises(ValueError, match="not in names"):
        category_expert_counts(HAND, ["keyword", "identifier", "keyword", "emoji"])


# -- prefetch recall ------------------------------------------------------------------------------
def test_recall_zero_layers_ahead_is_the_router_itself(model):
    r = prefetch_recall(model, ids_of(24, seed=3), ahead=(0, 1, 3), source="before")
    assert r["recall"].shape == (3, 8)
    assert r["recall"][0, 1] == pytest.approx(1.0)                       # p = top_k, a = 0
    assert r["recall"][0, 0] == pytest.approx(0.5)                       # p = 1 finds one of two
    torch.testing.assert_close(r["recall"][:, -1], torch.ones(3))        # p = E finds everything
    assert (r["recall"].diff(dim=1) >= 0).all()                          # more guesses never hurt
    assert torch.isnan(r["per_layer"][2, 1:]).all() and not torch.isnan(r["per_layer"][2, 0]).any()


def test_recall_is_one_when_the_residual_stream_never_changes(ckpt):
    # Identical norms and routers in every layer, and attention and experts that add nothing:
    # every layer sees the embedding, so any layer's guess equals every later layer's choice.
    m = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    first = m.model.layers[0]
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.gate.weight.copy_(first.mlp.gate.weight)
            layer.post_attention_layernorm.weight.copy_(first.post_attention_layernorm.weight)
    for source in ("before", "after"):
        r = prefetch_recall(m, ids_of(30, seed=4), ahead=(1, 2, 3), source=source)
        torch.testing.assert_close(r["recall"][:, 1], torch.ones(3))


def test_guesses_agree_with_recall_and_chunks_average_by_tokens(model):
    a, b = ids_of(10, seed=5), ids_of(22, seed=6)
    ra = prefetch_recall(model, a, ahead=1, source="after")["recall"]
    rb = prefetch_recall(model, b, ahead=1, source="after")["recall"]
    both = prefetch_recall(model, [a, b], ahead=1, source="after")
    assert both["tokens"] == 32
    torch.testing.assert_close(both["recall"], (10 * ra + 22 * rb) / 32)
    g = guess_experts(model, [a, b], 2, source="after", ahead=1)               # [L, 32, 2]
    used = RoutingTrace.cat([record_routing(model, a), record_routing(model, b)]).experts
    assert (g[0] == -1).all()
    found = (g[1:, :, :, None] == used[1:, :, None, :]).any(-1).sum(-1).float() / 2   # [L-1, T]
    assert found.mean().item() == pytest.approx(both["recall"][0, 1].item(), abs=1e-6)


def test_recall_arguments_are_checked(model):
    with pytest.raises(ValueError, match="ahead"):
        prefetch_recall(model, ids_of(4), ahead=(4,))
    with pytest.raises(ValueError, match="source"):
        prefetch_recall(model, ids_of(4), source="middle")
    with pytest.raises(ValueError, match="max_prefetch"):
        prefetch_recall(model, ids_of(4), max_prefetch=9)


# -- the simulator against the engine, end to end -------------------------------------------------
def decode_and_simulate(ckpt, device, dtype, cache_size, prefetch, source):
    """Decode from a one-token prompt (one token per forward, as the simulator assumes) on the
    offloaded model; return its own counters and the simulator's replay of its trace."""
    from moe_colab.analysis.simulate import simulate_prefetch

    off = moe_colab.load_model(ckpt, device=device, dtype=dtype, experts_on_device=cache_size,
                               prefetch=prefetch, guess_from=source, progress=False)
    off.reset_offload_stats()
    trace = record_routing(off, ids_of(1, seed=7), max_new_tokens=24,
                           generate_kwargs={"pad_token_id": 0, "min_new_tokens": 24})
    engine = off.offload_stats()
    if prefetch:
        guesses, probs = guess_experts(off, trace.token_ids, prefetch, source=source, with_probs=True)
        sim = simulate_prefetch(trace, guesses, cache_size, prefetch, probs=probs,
                                min_prob=off.moe_cache.min_prob)
    else:
        sim = moe_colab.simulate_cache(trace, cache_size, "lru")
    return engine, sim


@pytest.mark.parametrize("cache_size,prefetch,source", [(2, 0, "before"), (3, 1, "before"), (2, 2, "before"),
                                                        (4, 2, "after")])
def test_simulator_reproduces_the_engines_counters(ckpt, cache_size, prefetch, source):
    engine, sim = decode_and_simulate(ckpt, "cpu", torch.float32, cache_size, prefetch, source)
    assert sim["uses"] == 25 * 4 * 2
    names = ("hits", "misses") + (("prefetches", "prefetch_hits", "prefetch_wasted") if prefetch else ())
    assert {n: sim[n] for n in names} == {n: engine[n] for n in names}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_fp16_recording_and_simulation_match_the_engine(ckpt):
    ref = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    off = moe_colab.load_model(ckpt, device="cuda", dtype=torch.float16, experts_on_device=3,
                               prefetch=2, progress=False)
    ids = ids_of(64, seed=8)
    a, b = record_routing(ref, ids), record_routing(off, ids)
    assert torch.equal(a.experts[0], b.experts[0])                 # same input, same router
    # Later layers see fp16 expert sums in another order: allow rare flips of near-ties.
    assert (a.experts == b.experts).float().mean() > 0.98
    r = prefetch_recall(off, ids, ahead=(0, 1), source="before")
    assert r["recall"][0, 1] == pytest.approx(1.0)
    engine, sim = decode_and_simulate(ckpt, "cuda", torch.float16, 2, 0, "before")
    assert (sim["hits"], sim["misses"]) == (engine["hits"], engine["misses"])
