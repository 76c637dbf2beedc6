"""Never crash Colab: what happens when things go wrong half-way.

    an interrupt (Ctrl-C, Colab's stop button) in the middle of generate   CPU here, CUDA below
    CUDA out of memory during generate                                     gpu
    a planner refusal                                                      allocates nothing
Covered elsewhere, not repeated here: a corrupt or truncated shard is named before anything large
is allocated (tests/test_loading.py: test_truncated_shard_named, test_corrupt_header_named,
test_full_size_config_fails_fast_without_allocating); a Colab quantization interrupted by a
disconnect or an interrupt resumes without redoing finished shards (tests/test_hub.py), and
moe_colab.quantize itself resumes (the quant engineer's tests).
"""
from __future__ import annotations

import gc
import tracemalloc

import psutil
import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.config import mixtral_config
from moe_colab.planner import COLAB_T4, PlanError, plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IDS = torch.tensor([[5, 9, 17, 33, 2, 71, 8]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("faults") / "ck", layers=4, experts=6, top_k=2, heads=4,
                            kv_heads=2, hidden=32, intermediate=64, vocab=128, seed=21)


def load(path, device="cpu", **kw):
    kw = {"experts_on_device": 2, "prefetch": 2, "dtype": torch.float32, "progress": False, **kw}
    return moe_colab.load_model(path, device=device, **kw)


def greedy(model, ids=IDS, n=24):
    out = model.generate(ids.to(model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences.cpu(), torch.stack(out.logits, 1).cpu()


def assert_cache_consistent(model, fresh):
    """Every slot holds what it claims: LRU and slots agree, in swap mode every expert has a copy
    (a host row, a slot, or both), rows and owners agree, and every copy's bytes equal the fresh
    model's copy of that expert."""
    cache, ref = model.moe_cache, fresh.moe_cache
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    store = cache.store
    for l, lc in enumerate(cache.layers):
        held = {s.expert: s for s in lc.slots if s.expert is not None}
        assert set(held) == set(lc.lru), (l, set(held), list(lc.lru))
        assert all(lc.lru[e] is held[e] for e in held)
        for e, slot in held.items():
            assert torch.equal(slot.buffer.cpu(), ref.store.buffer(l, e)), f"layer {l} slot of expert {e}"
        if store.swap:
            homes = store.home[l]
            for e in range(store.num_experts):
                assert homes[e] is not None or e in held, f"layer {l}: expert {e} has no copy left"
                if homes[e] is not None:
                    assert store.owner[l][homes[e]] == e, (l, e, homes[e])
                    assert torch.equal(store.buffer(l, e), ref.store.buffer(l, e)), f"layer {l} row of expert {e}"
            rows = [h for h in homes if h is not None]
            assert len(rows) == len(set(rows))


def interrupt_after(module, calls: int, pre: bool = False):
    """A hook raising KeyboardInterrupt on the ``calls``-th forward of ``module`` (as if the user
    pressed Ctrl-C there); returns the handle."""
    seen = {"n": 0}

    def hook(*_):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
    return module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)


def interrupt_inside_experts(model, calls: int):
    """Raise KeyboardInterrupt from the ``calls``-th expert computation: inside the cache's
    cache.experts generator, with copies issued and slots half reused."""
    fmt = model.moe_cache.store.format
    real, seen = fmt.forward, {"n": 0}

    def forward(views, x):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        return real(views, x)
    fmt.forward = forward
    return lambda: fmt.__dict__.pop("forward")


@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
@pytest.mark.parametrize("where", ["moe-hook", "moe-pre-hook", "inside-experts"])
def test_interrupt_mid_generate_then_generate_equals_fresh(ckpt, swap, where):
    fresh = load(ckpt, swap=swap)
    want = greedy(fresh)
    model = load(ckpt, swap=swap)
    layers = model.model.layers
    if where == "inside-experts":
        undo = interrupt_inside_experts(model, calls=37)
    else:
        handle = interrupt_after(layers[len(layers) // 2].mlp, calls=9, pre=where == "moe-pre-hook")
        undo = handle.remove
    with pytest.raises(KeyboardInterrupt):
        greedy(model)
    undo()
    assert_cache_consistent(model, load(ckpt, swap=False))
    got = greedy(model)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_repeated_interrupts_keep_the_model_usable(ckpt):
    fresh = load(ckpt)
    want = greedy(fresh)
    model = load(ckpt)
    for calls in (3, 11, 29, 50):
        undo = interrupt_inside_experts(model, calls)
        with pytest.raises(KeyboardInterrupt):
            greedy(model)
        undo()
    assert torch.equal(greedy(model)[0], want[0])


# -- a refusal allocates nothing ---------------------------------------------------------------
def rss() -> int:
    return psutil.Process().memory_info().rss


def test_a_refused_plan_allocates_nothing():
    cfg = mixtral_config("mixtral-8x7b")
    plan(cfg, "paper-2bit", device="cuda", **COLAB_T4)           # warm imports and caches
    gc.collect()
    tracemalloc.start()
    before = rss()
    for _ in range(3):
        with pytest.raises(PlanError):
            plan(cfg, None, device="cuda", **COLAB_T4)           # asks for ~90 GB of experts
    grew = rss() - before
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"Python allocations peaked at {peak} bytes"
    assert grew < 32 * 2**20, f"RSS grew by {grew} bytes"


def test_load_model_auto_refuses_before_allocating(ckpt, monkeypatch):
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", str(64 * 2**20))      # 64 MB: nothing fits
    monkeypatch.setenv("MOE_COLAB_DEVICE_BYTES", str(64 * 2**20))
    gc.collect()
    before = rss()
    try:
        with pytest.raises(PlanError, match="budget"):
            load(ckpt, experts_on_device="auto")
    except TypeError as e:
        if "experts_on_device" in str(e):
            pytest.skip(f"load_model does not accept experts_on_device='auto' yet: {e}")
        raise
    assert rss() - before < 32 * 2**20


@pytest.mark.gpu
@needs_cuda
def test_a_refused_plan_on_cuda_leaves_cuda_memory_unchanged(ckpt, monkeypatch):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(PlanError):
        plan(mixtral_config("mixtral-8x7b"), None, device="cuda", device_bytes=15 * 2**30, host_bytes=12.7e9)
    with pytest.raises(PlanError):
        plan(mixtral_config("mixtral-8x7b"), None, device="cuda", host_bytes=12.7e9)   # GPU measured
    monkeypatch.setenv("MOE_COLAB_DEVICE_BYTES", str(64 * 2**20))
    try:
        with pytest.raises(PlanError):
            load(ckpt, device="cuda", experts_on_device="auto")
    except TypeError as e:
        if "experts_on_device" not in str(e):
            raise
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# -- CUDA ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("faults_gpu") / "ck", layers=4, experts=8, top_k=2, heads=8,
                            kv_heads=2, hidden=512, intermediate=1408, vocab=512, seed=22)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_interrupt_on_cuda_then_generate_equals_fresh(gpu_ckpt, swap):
    fresh = load(gpu_ckpt, "cuda", swap=swap, experts_on_device=3)
    want = greedy(fresh)
    model = load(gpu_ckpt, "cuda", swap=swap, experts_on_device=3)
    for calls in (7, 23):
        undo = interrupt_inside_experts(model, calls)
        with pytest.raises(KeyboardInterrupt):
            greedy(model)
        undo()
    handle = interrupt_after(model.model.layers[2].mlp, calls=5)
    with pytest.raises(KeyboardInterrupt):
        greedy(model)
    handle.remove()
    assert_cache_consistent(model, load(gpu_ckpt, "cpu", experts_on_device=3))
    got = greedy(model)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_out_of_memory_during_generate_is_clear_and_recoverable(gpu_ckpt):
    fresh = load(gpu_ckpt, "cuda", experts_on_device=3)
    want = greedy(fresh)
    del fresh
    gc.collect()
    model = load(gpu_ckpt, "cuda", experts_on_device=3)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # Room for the model and a little more, not for a 32 x 1024-token batch (~GBs of activations).
    cap = (torch.cuda.memory_allocated() + 96 * 2**20) / total
    big = torch.randint(3, 512, (32, 1024))
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        with pytest.raises(RuntimeError) as err:     # torch.cuda.OutOfMemoryError, or the engine's own
            model.generate(big.cuda(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "out of memory" in str(err.value).lower()
    del err
    gc.collect()
    torch.cuda.empty_cache()
    assert_cache_consistent(model, load(gpu_ckpt, "cpu", experts_on_device=3))
    got = greedy(model)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
