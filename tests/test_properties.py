"""Property test: for random small Mixtral configs, cache sizes, prefetch counts, copy or swap mode,
batch sizes and prompt lengths, the offloaded model generates exactly what transformers'
MixtralForCausalLM generates from the same checkpoint (CPU, float32: greedy tokens equal, logits
to 1e-5). Hypothesis picks the cases; 25 of them take ~15 s."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint


@st.composite
def cases(draw):
    experts = draw(st.integers(2, 6))
    heads = draw(st.sampled_from([2, 4, 8]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    model = dict(layers=draw(st.integers(1, 3)), experts=experts, top_k=draw(st.integers(1, experts)),
                 heads=heads, kv_heads=kv_heads, hidden=heads * head_dim,
                 intermediate=draw(st.sampled_from([16, 32, 48])), vocab=draw(st.integers(40, 96)),
                 seed=draw(st.integers(0, 10**6)))
    swap = draw(st.booleans())
    engine = dict(experts_on_device=draw(st.integers(1, experts)), prefetch=draw(st.integers(0, experts)),
                  swap=swap)
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 8), min_size=batch, max_size=batch))
    return model, engine, lengths, draw(st.integers(1, 10)), draw(st.integers(0, 2**31 - 1))


def left_padded(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, -n:] = 1
    return ids, mask


def greedy(model, ids, mask, new):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_offloaded_equals_transformers(case):
    model_kw, engine_kw, lengths, new, seed = case
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", **model_kw)
        ref = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
        ours = moe_colab.load_model(path, device="cpu", dtype=torch.float32, progress=False, **engine_kw)
        ids, mask = left_padded(lengths, model_kw["vocab"], seed)
        want_seq, want_logits = greedy(ref, ids, mask, new)
        got_seq, got_logits = greedy(ours, ids, mask, new)
    where = f"{model_kw} {engine_kw} lengths={lengths} new={new}"
    assert torch.equal(got_seq, want_seq), where
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0, msg=where)
    stats = ours.offload_stats()
    assert stats["hits"] + stats["misses"] > 0
    assert stats["prefetch_hits"] <= stats["prefetches"]
