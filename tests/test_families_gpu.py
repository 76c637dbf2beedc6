"""Every family on CUDA in float16 and bfloat16 against transformers' own class, and the batched
low-bit path (engine/batched.py, quant/grouped.py) on the GPU: against one call per expert, and
under a stress of small caches with prefetch (a copy overwriting a slot under the batched kernels
would change the bits).

    pytest -q -m gpu tests/test_families_gpu.py -s        (about a minute on an H200)
"""
from __future__ import annotations

import pytest
import torch

import moe_colab
from families import COMMON, MLA, reference, write_family_checkpoint
from moe_colab.config import OffloadOptions
from moe_colab.quant.config import QuantConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Wider than the CPU checkpoints (hidden 256, experts of 128..256) so kernels and copies take real time.
WIDE = dict(vocab_size=512, hidden_size=256, num_attention_heads=8, num_key_value_heads=2)
GPU_SPECS = {
    "qwen3_moe": ("qwen3_moe", dict(WIDE, num_hidden_layers=4, head_dim=32, intermediate_size=512,
                                    moe_intermediate_size=128, num_experts=32, num_experts_per_tok=8,
                                    norm_topk_prob=True, mlp_only_layers=[0]), "2MB", "per_expert"),
    "qwen2_moe": ("qwen2_moe", dict(WIDE, num_hidden_layers=3, intermediate_size=512, moe_intermediate_size=128,
                                    shared_expert_intermediate_size=512, num_experts=16, num_experts_per_tok=4),
                  None, "per_expert"),
    "olmoe": ("olmoe", dict(WIDE, num_hidden_layers=3, intermediate_size=128, num_experts=16, num_experts_per_tok=4),
              None, "per_expert"),
    "phimoe": ("phimoe", dict(WIDE, num_hidden_layers=3, intermediate_size=256, num_local_experts=8,
                              num_experts_per_tok=2, router_jitter_noise=0.01), None, "per_expert"),
    "deepseek_v2": ("deepseek_v2", dict({**COMMON, **WIDE, **MLA}, num_hidden_layers=3, intermediate_size=512,
                                        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                                        n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                                        topk_method="greedy"), None, "per_expert"),
    "deepseek_v3": ("deepseek_v3", dict({**COMMON, **WIDE, **MLA}, num_hidden_layers=3, intermediate_size=512,
                                        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=64, n_group=4,
                                        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
                    None, "per_expert"),
    "gpt_oss": ("gpt_oss", dict(WIDE, num_hidden_layers=3, head_dim=32, intermediate_size=256, num_local_experts=16,
                                num_experts_per_tok=4, sliding_window=16), None, "fused"),
    "gpt_oss_mxfp4": ("gpt_oss", dict(WIDE, num_hidden_layers=3, head_dim=32, intermediate_size=256,
                                      num_local_experts=16, num_experts_per_tok=4, sliding_window=16), 2, "mxfp4"),
}
for _spec in GPU_SPECS.values():
    _spec[1].setdefault("num_key_value_heads", 2)
    if _spec[0].startswith("deepseek"):
        _spec[1]["num_key_value_heads"] = _spec[1]["num_attention_heads"]


@pytest.fixture(scope="module")
def gpu_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("famgpu")
    return {n: write_family_checkpoint(root / n, spec, seed=i) for i, (n, spec) in enumerate(GPU_SPECS.items())}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(GPU_SPECS))
def test_family_matches_transformers_on_cuda(gpu_ckpts, name, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    spec = GPU_SPECS[name]
    ref = reference(gpu_ckpts[name], spec, dtype=dtype, device="cuda")
    model = moe_colab.load_model(gpu_ckpts[name], device="cuda", dtype=dtype, experts_on_device=4, prefetch=2,
                                 progress=False)
    ids = torch.randint(3, 512, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    seq = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a, b = ref(seq).logits.float(), model(seq).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    ref_seq = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    agree = (ref_seq[:, 12:] == seq[:, 12:]).float().mean().item()
    print(f"{name} {str(dtype)[6:]}: relative logit error {rel:.2e}, greedy agreement {agree:.3f}, "
          f"stats {model.offload_stats()}")
    assert rel < (5e-3 if dtype == torch.float16 else 2e-2), rel
    assert agree >= 0.9, agree
    # one sequence: the one-token path (a layer's experts collected, then computed together)
    one = model.generate(ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    ref_one = ref.generate(ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert (one[:, 12:] == ref_one[:, 12:]).float().mean().item() >= 0.9
    stats = model.offload_stats()
    assert stats["prefetch_hits"] > 0 and "fallbacks" not in stats


@pytest.fixture(scope="module")
def quantized_qwen3(gpu_ckpts, tmp_path_factory):
    out = {}
    for bits in (4, 3):
        # groups that fit whole in every plane of 256- and 128-wide inputs: the grouped kernel runs
        q = QuantConfig(4, bits, attn_group_size=64, expert_group_size=64 if bits == 4 else 16)
        out[bits] = moe_colab.quantize(gpu_ckpts["qwen3_moe"], tmp_path_factory.mktemp(f"q{bits}") / "q", q,
                                       progress=False, device="cuda")
    return out


def _decode(model, ids, n=24):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("bits", [4, 3])
def test_grouped_experts_match_one_call_per_expert_on_cuda(quantized_qwen3, bits):
    """The grouped path really runs (first-use check passed, no fallback), agrees with one call per
    expert, and launches fewer kernels per token (printed for the report)."""
    from torch.profiler import ProfilerActivity, profile
    qdir = quantized_qwen3[bits]
    ids = torch.randint(3, 512, (1, 10), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for batched in (True, False):
        model = moe_colab.load_model(qdir, device="cuda", dtype=torch.float16, experts_on_device=12, prefetch=4,
                                     progress=False, options=OffloadOptions(batched_experts=batched))
        _decode(model, ids, 8)                                   # warm-up: compiles, graph captures
        out = _decode(model, ids)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t[0].record()
            _decode(model, ids, 16)
            t[1].record()
            torch.cuda.synchronize()
        launches = sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key or "GraphLaunch" in e.key)
        runs[batched] = (out, launches / 16, t[0].elapsed_time(t[1]) / 16, model.offload_stats(),
                         dict(model.offload_compute.tested))
    (ob, lb, mb, sb, tb), (ou, lu, mu, su, _) = runs[True], runs[False]
    print(f"{bits}-bit: launches/token batched {lb:.0f} vs one call per expert {lu:.0f}; ms/token {mb:.2f} vs {mu:.2f}")
    assert "fallbacks" not in sb, sb.get("fallbacks")
    assert any(len(k) == 3 and v == "ok" for k, v in tb.items()), tb           # the grouped check ran and passed
    agree = (ob.sequences == ou.sequences).float().mean().item()
    a, b = torch.stack(ou.logits).float(), torch.stack(ob.logits).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert agree >= 0.9 and rel < 5e-3, (agree, rel)
    assert lb < lu


def test_batched_slots_are_never_overwritten_under_the_kernels(quantized_qwen3):
    """Many short generations with small caches (>= top_k slots, so the layer batches) and prefetch
    give bit-identical logits to the same model with every expert resident: the same grouped
    kernels on the same data. A copy into a slot under the batched kernels would change them."""
    qdir = quantized_qwen3[4]
    kw = dict(device="cuda", dtype=torch.float16, progress=False)
    resident = moe_colab.load_model(qdir, experts_on_device=32, prefetch=0, **kw)
    configs = [(8, 2, False), (9, 4, False), (10, 3, True), (8, 6, True)]
    models = {c: moe_colab.load_model(qdir, experts_on_device=c[0], prefetch=c[1], swap=c[2], **kw) for c in configs}
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        c = configs[trial % len(configs)]
        n = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(3, 512, (1, n), generator=g).cuda()
        out, ref = _decode(models[c], ids, 8), _decode(resident, ids, 8)
        assert torch.equal(out.sequences, ref.sequences), (trial, c)
        assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits)), (trial, c)
    assert sum(m.offload_stats()["misses"] for m in models.values()) > 0
    assert all("fallbacks" not in m.offload_stats() for m in models.values())


def test_family_model_on_cuda_has_no_fallback_and_keeps_fp32_routers(gpu_ckpts):
    """DeepSeek's routers stay float32 under a 16-bit load (as transformers keeps them)."""
    model = moe_colab.load_model(gpu_ckpts["deepseek_v3"], device="cuda", dtype=torch.bfloat16,
                                 experts_on_device=4, prefetch=1, progress=False)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.shared_experts.gate_proj.weight.dtype == torch.bfloat16
