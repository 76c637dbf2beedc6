"""The memory planner: its verdicts for Mixtral-8x7B on a Colab T4, and its byte counts checked
against what the engine really allocates on small random checkpoints (CPU)."""
from __future__ import annotations

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.config import mixtral_config
from moe_colab.memory import kv_cache_bytes, parse_bytes, pinned_allocation_bytes
from moe_colab.planner import COLAB_T4, GiB, PlanError, plan, resolve_experts_on_device
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.format import QuantizedExpertFormat

MIXTRAL = mixtral_config("mixtral-8x7b")
T4 = dict(device="cuda", **COLAB_T4)


# -- Mixtral-8x7B on a free Colab T4 -----------------------------------------------------------
def test_t4_paper_2bit_finds_a_plan():
    p = plan("mixtral-8x7b", "paper-2bit", **T4)
    assert p.fits and p.device_free >= 0 and p.host_free >= 0
    assert p.top_k <= p.experts_on_device < p.num_experts
    # Exact layout bytes, and the sums the table shows.
    assert p.expert_bytes == QuantizedExpertFormat(4096, 14336, QuantConfig(4, 2)).layout.nbytes
    assert p.cache_bytes == (32 * p.experts_on_device + p.spare_slots) * p.expert_bytes
    assert p.device_total + p.device_margin_bytes + p.device_free == p.device_budget
    # Swap mode's extras: shared spare slots on the device, spare host rows from what is left.
    assert p.spare_slots == 2 and 0 <= p.extra_host_rows <= 32 * (p.experts_on_device - 1)
    assert p.host_expert_bytes == (32 * (8 - p.experts_on_device + 1) + p.extra_host_rows) * p.expert_bytes
    assert 0 <= p.host_free < p.expert_bytes                 # the rest of the host went to spare rows
    # Copy mode (every expert on the host) does not fit 12.7 GB: the plan needs swap mode.
    assert p.swap
    with pytest.raises(PlanError):
        plan("mixtral-8x7b", "paper-2bit", swap=False, **T4)
    # The largest k: one more slot per layer no longer fits the device.
    with pytest.raises(PlanError, match="device: needs"):
        plan("mixtral-8x7b", "paper-2bit", experts_on_device=p.experts_on_device + 1, **T4)
    assert p.load_kwargs() == {"experts_on_device": p.experts_on_device, "swap": True, "quant": "paper-2bit",
                               "extra_host_rows": p.extra_host_rows}


def test_a_device_budget_plans_for_an_accelerator_on_any_machine():
    """The planner's own docstring example, without device=: a laptop without CUDA plans for the
    T4 it was given a budget for (two pools), not for its own CPU (one pool)."""
    p = plan("mixtral-8x7b", quant="paper-2bit", device_bytes=15 * 2**30, host_bytes=12.7e9)
    assert p.device == "cuda" and not p.shared_pool
    assert (p.experts_on_device, p.swap) == (plan("mixtral-8x7b", "paper-2bit", **T4).experts_on_device, True)
    assert plan("tiny", device_bytes=2 * GiB, host_bytes=2 * GiB).device == "cuda"
    assert plan("tiny", host_bytes=2 * GiB, device="cpu").device == "cpu"


def test_t4_16bit_is_refused_with_numbers_and_a_way_out():
    with pytest.raises(PlanError) as err:
        plan("mixtral-8x7b", None, **T4)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "16-bit" in msg and "budget 15.00 GiB" in msg and "GiB" in msg
    assert "quant='paper-2bit'" in msg          # what to change
    p2 = plan("mixtral-8x7b", "paper-2bit", **T4)
    assert f"{p2.experts_on_device} experts per layer" in msg


def test_a_shorter_context_or_fewer_slots_are_offered():
    # A device budget just below the paper-2bit plan with a 32k context: shorter contexts fit.
    p = plan("mixtral-8x7b", "paper-2bit", max_context=512, **T4)
    tight = dict(T4, device_bytes=int((p.device_total + p.device_margin_bytes) / 0.95) + 1)
    with pytest.raises(PlanError, match=r"max_context=\d+"):
        plan("mixtral-8x7b", "paper-2bit", max_context=32768, **tight)
    with pytest.raises(PlanError, match="experts_on_device=") as err:
        plan("mixtral-8x7b", "paper-2bit", experts_on_device=8, **T4)
    best = plan("mixtral-8x7b", "paper-2bit", **T4).experts_on_device
    assert f"experts_on_device={best} instead of 8" in str(err.value)


def test_more_memory_never_means_fewer_experts():
    ks = []
    for gib in (12, 14, 16, 20, 24, 40, 80):
        try:
            ks.append(plan("mixtral-8x7b", "paper-2bit", device="cuda", device_bytes=gib * GiB,
                           host_bytes=200 * GiB).experts_on_device)
        except PlanError:
            ks.append(0)
    assert ks == sorted(ks) and ks[-1] == 8 and ks[0] < 8, ks


def test_copy_mode_when_the_host_holds_every_expert():
    p = plan("mixtral-8x7b", "paper-2bit", device="cuda", device_bytes=15 * GiB, host_bytes=64 * GiB)
    assert not p.swap
    assert p.host_expert_bytes == 32 * 8 * p.expert_bytes       # exact: storage.pinned_empty
    rounded = plan("mixtral-8x7b", "paper-2bit", device="cuda", device_bytes=15 * GiB, host_bytes=64 * GiB,
                   pinned_rounding=True)
    assert rounded.host_expert_bytes == 32 * pinned_allocation_bytes(8 * p.expert_bytes)


def test_swap_mode_host_bytes_follow_the_engine_formula():
    p = plan("mixtral-8x7b", "paper-2bit", **T4)
    rows = p.num_experts - p.experts_on_device + 1
    assert p.host_expert_bytes == (p.num_layers * rows + p.extra_host_rows) * p.expert_bytes


def test_pinned_rounding():
    assert [pinned_allocation_bytes(n) for n in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_context"):
        plan("mixtral-8x7b", "paper-2bit", max_context=0, **T4)
    with pytest.raises(ValueError, match="experts_on_device=9 is outside 1..8"):
        plan("mixtral-8x7b", "paper-2bit", experts_on_device=9, **T4)
    with pytest.raises(ValueError, match="device_bytes"):
        plan("mixtral-8x7b", "paper-2bit", device="cuda", device_bytes=-5, host_bytes=1e9)
    with pytest.raises(FileNotFoundError, match="not a preset"):
        plan("./no/such/dir", device="cpu", host_bytes=1e9)
    with pytest.raises(ValueError, match="unsupported"):
        plan("mixtral-8x7b", "paper-2bit", device="mps", host_bytes=1e9)


def test_display():
    p = plan("mixtral-8x7b", "paper-2bit", **T4)
    text, md = str(p), p._repr_markdown_()
    assert "paper-2bit" in text and "expert cache" in text and "swap mode" in text
    assert md.count("\n|") >= 8 and "| memory |" in md


def test_parse_bytes():
    assert parse_bytes("15GiB") == 15 * GiB and parse_bytes("12.7GB") == int(12.7e9)
    assert parse_bytes("1024") == 1024 and parse_bytes(None) is None and parse_bytes("") is None
    with pytest.raises(ValueError, match="byte count"):
        parse_bytes("15 parsecs")


def test_resolve_reads_budgets_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_COLAB_DEVICE_BYTES", "15GiB")
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", "12.7GB")
    p = plan("mixtral-8x7b", "paper-2bit", **T4)
    got = resolve_experts_on_device(MIXTRAL, "paper-2bit", "cuda", torch.float16)
    assert got == (p.experts_on_device, p.swap, p.extra_host_rows)
    fixed = p.experts_on_device
    assert resolve_experts_on_device(MIXTRAL, "paper-2bit", "cuda", torch.float16,
                                     experts_on_device=fixed)[:2] == (fixed, True)
    with pytest.raises(PlanError):     # top_k slots: swap mode would keep 7 of 8 experts on the host
        resolve_experts_on_device(MIXTRAL, "paper-2bit", "cuda", torch.float16, experts_on_device=p.top_k)
    with pytest.raises(PlanError):
        resolve_experts_on_device(MIXTRAL, None, "cuda", torch.float16)
    with pytest.raises(TypeError, match="'auto'"):
        resolve_experts_on_device(MIXTRAL, "paper-2bit", "cuda", torch.float16, experts_on_device="many")


# -- the byte counts against the engine (CPU, small checkpoints) --------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # hidden 64 so that the paper's 4-bit attention groups (64) divide it.
    return write_checkpoint(tmp_path_factory.mktemp("plan") / "ck", layers=2, experts=4, top_k=2, heads=4,
                            kv_heads=2, hidden=64, intermediate=128, vocab=128, seed=11)


def trunk_bytes_of(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quant_buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                        if ".self_attn." in n and "rotary" not in n)
    return params + quant_buffers


@pytest.mark.parametrize("quant", [None, "paper-2bit"])
@pytest.mark.parametrize("swap", [False, True])
def test_plan_matches_what_the_engine_allocates(ckpt, quant, swap):
    p = plan(ckpt, quant, device="cpu", dtype=torch.float32, host_bytes=64 * GiB, swap=swap,
             experts_on_device=3)
    model = moe_colab.load_model(ckpt, device="cpu", dtype=torch.float32, prefetch=0, progress=False,
                                 **p.load_kwargs())
    cache = model.moe_cache
    assert cache.experts_on_device == p.experts_on_device == 3 and cache.store.swap == swap
    assert cache.store.nbytes == p.expert_bytes
    assert cache.device_bytes == p.cache_bytes
    assert cache.store.host_bytes == p.host_expert_bytes        # CPU: no pinned rounding
    assert trunk_bytes_of(model) == p.trunk_bytes


def test_kv_cache_bytes_match_transformers(ckpt):
    model = moe_colab.load_model(ckpt, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=0,
                                 progress=False)
    out = model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=11, min_new_tokens=11,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv_cache_bytes(model.config, torch.float32, cache.get_seq_length())


def test_shared_pool_accounting_is_exact(ckpt):
    """On a CPU device one budget holds everything: exactly the bytes the plan says it uses fit,
    one byte less does not fit with the same number of slots."""
    roomy = plan(ckpt, device="cpu", dtype=torch.float32, host_bytes=4 * GiB)   # margin at its 256 MiB floor
    assert roomy.experts_on_device == 4 and not roomy.swap
    used = roomy.host_budget - roomy.host_free
    exact = plan(ckpt, device="cpu", dtype=torch.float32, host_bytes=used)
    assert exact.experts_on_device == 4 and exact.host_free == 0
    tighter = plan(ckpt, device="cpu", dtype=torch.float32, host_bytes=used - 1, min_experts_on_device=1)
    assert (tighter.experts_on_device, tighter.swap) != (4, False)
    assert tighter.host_free >= 0


def test_plan_of_a_loaded_model_and_of_a_directory_agree(ckpt):
    model = moe_colab.load_model(ckpt, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=0,
                                 progress=False)
    a = plan(model, device="cpu", dtype=torch.float32, host_bytes=8 * GiB)
    b = plan(ckpt, device="cpu", dtype=torch.float32, host_bytes=8 * GiB)
    assert (a.expert_bytes, a.trunk_bytes, a.experts_on_device) == (b.expert_bytes, b.trunk_bytes,
                                                                     b.experts_on_device)


def test_load_model_auto_uses_the_plan(ckpt, monkeypatch):
    """load_model(experts_on_device="auto") asks the planner (once the engine supports it)."""
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", str(64 * GiB))
    try:
        model = moe_colab.load_model(ckpt, device="cpu", dtype=torch.float32, experts_on_device="auto",
                                     progress=False)
    except TypeError as e:
        if "experts_on_device" in str(e):
            pytest.skip(f"load_model does not accept experts_on_device='auto' yet: {e}")
        raise
    p = plan(ckpt, device="cpu", dtype=torch.float32, host_bytes=64 * GiB)
    assert model.moe_cache.experts_on_device == p.experts_on_device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_pins_powers_of_two_as_the_planner_assumes():
    """129 MiB pinned takes 256 MiB (resident: pinned pages are locked), as pinned_allocation_bytes
    says; if torch stops rounding, the planner's host figures must change with it."""
    import psutil
    torch.cuda.init()
    stats = getattr(torch.cuda, "host_memory_stats", None)
    proc = psutil.Process()
    n = 129 * 2**20
    before_rss = proc.memory_info().rss
    before = stats().get("allocated_bytes.current", 0) if stats else 0
    t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    assert t.is_pinned()
    assert pinned_allocation_bytes(n) == 256 * 2**20
    if stats and "allocated_bytes.current" in stats():
        assert stats()["allocated_bytes.current"] - before == pinned_allocation_bytes(n)
    else:
        grew = proc.memory_info().rss - before_rss
        assert grew > 200 * 2**20, f"pinning {n} bytes grew RSS by only {grew} bytes: no power-of-two rounding?"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_store_pins_exact_sizes():
    """storage.pinned_empty page-locks exactly what it asks for (cudaHostRegister), so the
    planner counts rows * expert_bytes, not torch's power of two."""
    import psutil
    from moe_colab.engine.storage import pinned_empty
    torch.cuda.init()
    proc = psutil.Process()
    n = 129 * 2**20
    before = proc.memory_info().rss
    t = pinned_empty(1, n, pin=True)
    assert t.is_pinned()
    grew = proc.memory_info().rss - before
    assert n * 0.9 < grew < 150 * 2**20, grew
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    t.view(-1).fill_(7)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu.copy_(t.view(-1), non_blocking=True)
    stream.synchronize()
    assert int(gpu[::4096].min()) == 7


def test_plan_of_a_quantized_directory(ckpt, tmp_path):
    qdir = moe_colab.quantize(ckpt, tmp_path / "q", "paper-2bit", device="cpu", progress=False)
    p = plan(qdir, device="cpu", dtype=torch.float32, host_bytes=8 * GiB, experts_on_device=2)
    assert p.scheme == "paper-2bit"
    assert p.expert_bytes == plan(ckpt, "paper-2bit", device="cpu", dtype=torch.float32,
                                  host_bytes=8 * GiB).expert_bytes
    model = moe_colab.load_model(qdir, device="cpu", dtype=torch.float32, prefetch=0, progress=False,
                                 **p.load_kwargs())
    assert model.moe_cache.store.nbytes == p.expert_bytes
    assert model.moe_cache.device_bytes == p.cache_bytes
    assert trunk_bytes_of(model) == p.trunk_bytes
    with pytest.raises(ValueError, match="paper-3bit"):
        plan(qdir, "paper-3bit", device="cpu", host_bytes=8 * GiB)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", [None, "paper-2bit"])
def test_cuda_peak_memory_stays_within_the_plan(tmp_path, quant):
    """Prefill a prompt that fills max_context, then decode: the GPU's peak allocation stays under
    the plan's device total (trunk + slots + KV + workspace), and above trunk + slots."""
    ck = write_checkpoint(tmp_path / "ck", layers=2, experts=8, top_k=2, heads=8, kv_heads=2, hidden=1024,
                          intermediate=2816, vocab=2048, seed=4, shard_size="200MB")
    ctx = 1024
    p = plan(ck, quant, device="cuda", dtype=torch.float16, max_context=ctx, experts_on_device=4,
             device_bytes=64 * GiB, host_bytes=64 * GiB)
    model = moe_colab.load_model(ck, device="cuda", dtype=torch.float16, prefetch=2, progress=False,
                                 **p.load_kwargs())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(3, 2048, (1, ctx - 24), device="cuda")
    model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    peak = torch.cuda.max_memory_allocated()
    assert base >= p.trunk_bytes + p.cache_bytes - 2**20
    assert peak <= p.device_total, (f"peak {peak / 2**20:.1f} MiB > plan {p.device_total / 2**20:.1f} MiB "
                                    f"(workspace estimate {p.workspace_bytes / 2**20:.1f} MiB)")
