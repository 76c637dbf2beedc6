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


# -- issue 12: random sequences of generate / interrupt / reset_stats / concurrent calls ----------
# One model object lives through a whole sequence; after every step it must still generate what
# transformers generates, its statistics must behave (zero after a reset, never decreasing
# otherwise), and at the end every slot and host row must hold what it claims.
import functools  # noqa: E402
import threading  # noqa: E402

from test_faults import assert_cache_consistent, interrupt_inside_experts  # noqa: E402

SEQ_MODEL = dict(layers=3, experts=4, top_k=2, heads=4, kv_heads=2, hidden=32, intermediate=32, vocab=64, seed=12)


@functools.lru_cache(maxsize=None)
def seq_checkpoint() -> Path:
    return write_checkpoint(Path(tempfile.mkdtemp(prefix="moe_colab_seq_")) / "ck", **SEQ_MODEL)


@functools.lru_cache(maxsize=None)
def seq_reference():
    return MixtralForCausalLM.from_pretrained(seq_checkpoint(), dtype=torch.float32)


def seq_prompt(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SEQ_MODEL["vocab"], (1, 1 + seed % 6), generator=g)


@functools.lru_cache(maxsize=None)
def seq_want(seed: int, new: int):
    ids = seq_prompt(seed)
    return greedy(seq_reference(), ids, torch.ones_like(ids), new)


def seq_generate(model, seed, new):
    ids = seq_prompt(seed)
    return greedy(model, ids, torch.ones_like(ids), new)


def seq_check(got, seed, new, where):
    want = seq_want(seed, new)
    assert torch.equal(got[0], want[0]), where
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0, msg=where)


calls = st.tuples(st.integers(0, 11), st.integers(1, 5))        # (prompt seed, new tokens)
steps = st.one_of(
    st.tuples(st.just("generate"), calls),
    st.tuples(st.just("interrupt"), st.tuples(st.integers(0, 11), st.integers(1, 40))),
    st.tuples(st.just("reset"), st.none()),
    st.tuples(st.just("concurrent"), st.lists(calls, min_size=2, max_size=3)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(experts_on_device=st.integers(1, 4), prefetch=st.integers(0, 3), swap=st.booleans(),
       sequence=st.lists(steps, min_size=1, max_size=5))
def test_random_sequences_of_calls_stay_exact(experts_on_device, prefetch, swap, sequence):
    model = moe_colab.load_model(seq_checkpoint(), device="cpu", dtype=torch.float32, progress=False,
                                 experts_on_device=experts_on_device, prefetch=prefetch, swap=swap)
    uses = 0
    for i, (kind, arg) in enumerate(sequence):
        where = f"step {i} {kind} {arg} of {sequence} (k={experts_on_device}, prefetch={prefetch}, swap={swap})"
        if kind == "generate":
            seq_check(seq_generate(model, *arg), *arg, where)
        elif kind == "interrupt":                  # Ctrl-C at the n-th expert computation (if it comes)
            seed, at = arg
            undo = interrupt_inside_experts(model, at)
            try:
                seq_check(seq_generate(model, seed, 5), seed, 5, where)    # finished before the n-th
            except KeyboardInterrupt:
                pass
            finally:
                undo()
        elif kind == "reset":
            model.reset_offload_stats()
            stats = model.offload_stats()
            assert all(v == 0 for k, v in stats.items() if k != "fallbacks"), (where, stats)
            uses = 0
            continue
        else:
            results, errors = [None] * len(arg), []

            def work(j, seed, new):
                try:
                    results[j] = seq_generate(model, seed, new)
                except Exception as e:   # noqa: BLE001 -- reported below
                    errors.append(f"thread {j}: {type(e).__name__}: {e}")
            threads = [threading.Thread(target=work, args=(j, *c)) for j, c in enumerate(arg)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == [], (where, errors)
            for j, c in enumerate(arg):
                seq_check(results[j], *c, f"{where}, thread {j}")
        stats = model.offload_stats()
        assert stats["hits"] + stats["misses"] >= uses, (where, stats)
        assert stats["prefetch_hits"] <= stats["prefetches"], (where, stats)
        uses = stats["hits"] + stats["misses"]
    fresh = moe_colab.load_model(seq_checkpoint(), device="cpu", dtype=torch.float32, progress=False,
                                 experts_on_device=experts_on_device, prefetch=prefetch)
    assert_cache_consistent(model, fresh)
    seq_check(seq_generate(model, 3, 4), 3, 4, f"after {sequence}")
