"""The engine on CUDA: equivalence in float16/bfloat16 with prefetch on, copies that overlap
compute, and a stress test that would expose a read of a half-written slot."""
from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint
from moe_colab.config import OffloadOptions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    # Experts big enough (1024 x 2816, ~17 MB in 16-bit) that copies take real time.
    return write_checkpoint(tmp_path_factory.mktemp("gpu") / "ck", layers=4, experts=8, top_k=2,
                            heads=8, kv_heads=2, hidden=1024, intermediate=2816, vocab=512,
                            shard_size="200MB", seed=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_transformers_on_cuda(gpu_checkpoint, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    ref = MixtralForCausalLM.from_pretrained(gpu_checkpoint, dtype=dtype).cuda()
    model = moe_colab.load_model(gpu_checkpoint, device="cuda", dtype=dtype, experts_on_device=3,
                                 prefetch=2, progress=False)
    ids = torch.randint(3, 512, (2, 12), device="cuda")
    seq = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ref(seq).logits.float()
        b = model(seq).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < (5e-3 if dtype == torch.float16 else 2e-2), rel
    ref_seq = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    agree = (ref_seq[:, 12:] == seq[:, 12:]).float().mean().item()
    assert agree >= 0.9, agree
    stats = model.offload_stats()
    assert stats["prefetch_hits"] > 0


def test_copies_overlap_compute(gpu_checkpoint):
    """In a profile of decoding, some host-to-device copy runs while a compute kernel runs."""
    from torch.profiler import ProfilerActivity, profile

    model = moe_colab.load_model(gpu_checkpoint, device="cuda", dtype=torch.float16,
                                 experts_on_device=2, prefetch=2, progress=False)
    ids = torch.randint(3, 512, (1, 8), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)   # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [(e.time_range.start, e.time_range.end) for e in events if "Memcpy HtoD" in e.name]
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if "Memcpy" not in e.name and "Memset" not in e.name]
    assert copies and kernels
    overlapping = sum(1 for cs, ce in copies if any(ks < ce and cs < ke for ks, ke in kernels))
    assert overlapping > 0, f"{len(copies)} copies, none overlaps a kernel"
    assert model.offload_stats()["prefetch_hits"] > 0


def test_stress_no_half_written_slot(gpu_checkpoint):
    """Many short random generations with a tiny cache and prefetch must give bit-identical
    logits to the same model with every expert resident: the same kernels on the same data.
    A kernel that read a slot while it was being overwritten would change them."""
    resident = moe_colab.load_model(gpu_checkpoint, device="cuda", dtype=torch.float16,
                                    experts_on_device=8, prefetch=0, progress=False)
    g = torch.Generator().manual_seed(0)
    configs = [(1, 1), (1, 2), (2, 2), (3, 1), (2, 4)]
    models = {c: moe_colab.load_model(gpu_checkpoint, device="cuda", dtype=torch.float16,
                                      experts_on_device=c[0], prefetch=c[1], progress=False)
              for c in configs}
    for trial in range(40):
        c = configs[trial % len(configs)]
        n = int(torch.randint(2, 20, (1,), generator=g))
        b = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(3, 512, (b, n), generator=g).cuda()
        out = models[c].generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref = resident.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref.sequences), (trial, c)
        assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits)), (trial, c)
    assert sum(m.offload_stats()["prefetch_hits"] for m in models.values()) > 0


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_host_sync_values_and_outputs(gpu_checkpoint, mapped):
    """The layer's host sync returns exactly the device values, whether kernels write them into
    mapped pinned memory or they are copied; generation is identical either way."""
    from moe_colab.engine.hostsync import HostSync

    mode, other = ("mapped", "copy") if mapped else ("copy", "mapped")
    sync = HostSync(torch.device("cuda"), mode)
    a = torch.randint(0, 1000, (7,), device="cuda")
    b = torch.randint(-5, 5, (3,), device="cuda", dtype=torch.int32)
    assert sync.read(a, b) == a.tolist() + b.tolist()
    assert sync.mapped == (mapped and sync.mapped)       # copied mode never maps
    print("mapped sync in use:", sync.mapped)
    kw = dict(device="cuda", dtype=torch.float16, experts_on_device=3, prefetch=2, progress=False)
    model = moe_colab.load_model(gpu_checkpoint, options=OffloadOptions(host_sync=mode), **kw)
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (1, 10), device="cuda")
    out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    del model
    again_model = moe_colab.load_model(gpu_checkpoint, options=OffloadOptions(host_sync=other), **kw)
    again = again_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(out, again)


def test_cuda_graphs_match_eager(tmp_path):
    """With CUDA graphs on, one-token calls replay CUDA graphs from their third call on: the
    experts of every slot and the attention projections. Same kernels (deterministic: split-K's
    partial sums are added in a fixed order), so the same scores and greedy tokens as eager calls.
    Scores hold -inf where min_new_tokens masks EOS: compared where finite, -inf in the same places."""
    from moe_colab.quant.format import QuantLinear

    ck = write_checkpoint(tmp_path / "ck", layers=2, experts=8, top_k=2, heads=8, kv_heads=2, hidden=512,
                          intermediate=1408, vocab=512, seed=3)
    q = moe_colab.quantize(ck, tmp_path / "q", "paper-2bit", progress=False)
    ids = torch.randint(3, 512, (1, 12), device="cuda")
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    load = dict(device="cuda", dtype=torch.float16, experts_on_device=3, prefetch=2, progress=False)
    model = moe_colab.load_model(q, cuda_graphs=True, **load)
    with_graphs = model.generate(ids, **kw)
    slot_views = [s.views for lc in model.moe_cache.layers for s in lc.slots]
    experts = sum(len(v.cached[1].graphs) for v in slot_views if getattr(v, "cached", None))
    linears = sum(len(m._graphs.graphs) for m in model.modules() if isinstance(m, QuantLinear))
    assert model.offload_stats().get("fallbacks") is None
    del model
    eager = moe_colab.load_model(q, cuda_graphs=False, **load).generate(ids, **kw)
    assert experts > 0 and linears > 0, (experts, linears)      # graphs were captured and replayed
    a = torch.stack(eager.scores).float()
    b = torch.stack(with_graphs.scores).float()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)) and torch.equal(a.isneginf(), b.isneginf())
    finite = torch.isfinite(a)
    assert ((a[finite] - b[finite]).norm() / a[finite].norm()).item() < 1e-3
    assert torch.equal(eager.sequences, with_graphs.sequences)


def test_logits_bitwise_equal_across_cache_sizes_prefetch_and_swap(tmp_path):
    """The same tokens on every path: a quantized model's fp16 logits do not depend on which
    experts were hits, prefetched or copied (fixed combination order, no order-dependent
    accumulation), for every cache size, prefetch count and copy/swap mode, with CUDA graphs."""
    ck = write_checkpoint(tmp_path / "ck", layers=3, experts=8, top_k=2, heads=8, kv_heads=2, hidden=512,
                          intermediate=1408, vocab=512, seed=11)
    q = moe_colab.quantize(ck, tmp_path / "q", "paper-2bit", progress=False)
    ids = torch.randint(3, 512, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    runs = {}
    for k, prefetch, swap in [(8, 0, False), (2, 0, False), (3, 2, False), (4, 1, False), (2, 2, True),
                              (5, 2, True), (3, 0, True)]:
        model = moe_colab.load_model(q, device="cuda", dtype=torch.float16, experts_on_device=k,
                                     prefetch=prefetch, swap=swap, progress=False)
        out = model.generate(ids, **kw)
        runs[(k, prefetch, swap)] = (out.sequences, torch.stack(out.logits))
        assert model.offload_stats().get("fallbacks") is None
        del model
    (ref_seq, ref_logits), *_ = runs.values()
    for key, (seq, logits) in runs.items():
        assert torch.equal(seq, ref_seq), key
        assert torch.equal(logits, ref_logits), (key, (logits.float() - ref_logits.float()).abs().max().item())
