"""Concurrent use of one offloaded model: several threads calling generate at once.

The expert cache is not thread-safe (slots, LRU order, queued guesses and, in swap mode, the
only copy of some experts change layer by layer), so the model runs one forward at a time
(OffloadedModelMixin.offload_lock). Before that lock the probe saw KeyError in the cache, wrong
logits, and a model broken for every later call. Here 4 threads generate at once, in copy and in
swap mode, each must equal transformers' MixtralForCausalLM run alone, and the model must stay
consistent and exact afterwards.
"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint
from test_faults import assert_cache_consistent

THREADS = 4
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("threads") / "ck", layers=3, experts=6, top_k=2, heads=4,
                            kv_heads=2, hidden=32, intermediate=64, vocab=128, seed=31)


@pytest.fixture(scope="module")
def reference(ckpt):
    return MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def prompts():
    """Different lengths (a batch of two, left-padded, among them) so the threads' forwards
    differ in shape and routing."""
    out = []
    for i in range(THREADS):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(3, 128, (1, 4 + 3 * i), generator=g)
        out.append((ids, torch.ones_like(ids)))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    out[1] = (ids, mask)
    return out


def greedy(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def run_together(model, cases):
    """Every case in its own thread, started together; (results, errors)."""
    results, errors = [None] * len(cases), []
    start = threading.Barrier(len(cases))

    def work(i):
        try:
            start.wait()
            results[i] = greedy(model, *cases[i])
        except Exception as e:          # noqa: BLE001 -- reported below, with its thread
            errors.append(f"thread {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


def load(path, **kw):
    return moe_colab.load_model(path, device="cpu", dtype=torch.float32, progress=False, **kw)


@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_concurrent_generate_equals_transformers_and_leaves_the_model_exact(ckpt, reference, swap):
    cases = prompts()
    want = [greedy(reference, *c) for c in cases]
    model = load(ckpt, experts_on_device=2, prefetch=2, swap=swap)
    for round_ in range(2):                     # twice: the second round starts from a used cache
        got, errors = run_together(model, cases)
        assert errors == []
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g[0], w[0]), f"round {round_}, thread {i}: tokens differ"
            torch.testing.assert_close(g[1], w[1], atol=1e-5, rtol=0, msg=f"round {round_}, thread {i}")
    assert_cache_consistent(model, load(ckpt, experts_on_device=2, prefetch=2))
    for c, w in zip(cases, want):               # and alone, afterwards
        g = greedy(model, *c)
        assert torch.equal(g[0], w[0])
        torch.testing.assert_close(g[1], w[1], atol=1e-5, rtol=0)


def test_statistics_read_and_reset_while_others_generate(ckpt, reference):
    """offload_stats()/reset_offload_stats() from another thread see whole forwards: counters
    are ints that never go backwards between resets, and the generations stay exact."""
    cases = prompts()[:3]
    want = [greedy(reference, *c) for c in cases]
    model = load(ckpt, experts_on_device=3, prefetch=1, swap=True)
    done = threading.Event()
    seen, problems = [], []

    def watch():
        last = None
        while not done.is_set():
            s = model.offload_stats()
            if last is not None and s["hits"] + s["misses"] < last:
                problems.append(f"expert uses went from {last} to {s['hits'] + s['misses']} without a reset")
            last = s["hits"] + s["misses"]
            seen.append(last)
            if len(seen) % 50 == 0:
                model.reset_offload_stats()
                last = None
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got, errors = run_together(model, cases)
    finally:
        done.set()
        watcher.join()
    assert errors == [] and problems == [] and seen
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0])


def test_the_lock_is_visible_and_generate_keeps_its_signature(ckpt):
    """The lock is documented API (model.offload_lock); forward's signature is the original one
    (generate inspects it), so holding the lock from outside serializes with generate too."""
    import inspect
    model = load(ckpt, experts_on_device=2)
    assert "input_ids" in inspect.signature(model.forward).parameters
    ids, mask = prompts()[0]
    result = []
    with model.offload_lock:
        t = threading.Thread(target=lambda: result.append(greedy(model, ids, mask)))
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and not result, "generate ran while another thread held offload_lock"
    t.join(timeout=60)
    assert result


# -- CUDA: streams, events and CUDA graphs under threads ---------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    # Experts large enough (~2.9 MB in fp16) that copies overlap compute and guesses are queued.
    return write_checkpoint(tmp_path_factory.mktemp("threads_gpu") / "ck", layers=4, experts=8, top_k=2, heads=8,
                            kv_heads=2, hidden=512, intermediate=1408, vocab=512, seed=32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_concurrent_generate_on_cuda_equals_each_run_alone(gpu_ckpt, swap):
    """On the GPU the oracle is the same engine run alone (test_engine_gpu checks it against
    transformers; the engine's logits do not depend on what is cached: test_stress_no_half_written_slot)."""
    def cuda_load():
        return moe_colab.load_model(gpu_ckpt, device="cuda", dtype=torch.float16, progress=False,
                                    experts_on_device=3, prefetch=2, swap=swap)
    cases = [(ids.cuda(), mask.cuda()) for ids, mask in prompts()]
    alone = cuda_load()
    want = [tuple(t.cpu() for t in greedy(alone, *c)) for c in cases]
    del alone
    model = cuda_load()
    for round_ in range(2):
        got, errors = run_together(model, cases)
        assert errors == []
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g[0].cpu(), w[0]), f"round {round_}, thread {i}: tokens differ"
            torch.testing.assert_close(g[1].cpu(), w[1], atol=5e-3, rtol=0)
    fresh = moe_colab.load_model(gpu_ckpt, device="cpu", dtype=torch.float16, progress=False, experts_on_device=3)
    assert_cache_consistent(model, fresh)
