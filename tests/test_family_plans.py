"""Presets, the planner, estimate_size and quantize for every family beyond Mixtral.

The presets are checked against transformers' config classes (the family's model built on the
meta device: parameter totals as published); the planner's byte counts against what the engine
allocates for tiny checkpoints of each family (trunk with dense layers, shared experts and
float32 routers; cache; host rows) and against transformers' own KV cache (GQA, DeepSeek's MLA
latent, GPT-OSS's sliding layers); estimate_size against the bytes quantize() writes; and a
quantized family model against transformers' class carrying the same dequantized experts.
"""
from __future__ import annotations

import math

import pytest
import torch

import moe_colab
from families import FAMILY_CHECKPOINTS, family_model, reference, write_family_checkpoint
from moe_colab.adapters import adapter_for
from moe_colab.config import FAMILY_PRESETS, preset_config
from moe_colab.memory import kv_cache_bytes
from moe_colab.planner import COLAB_T4
from moe_colab.quant.config import QuantConfig

GiB = 2**30

# Published totals (billions of parameters) and routed-expert shapes (experts x top-k, [I, H]).
PUBLISHED = {
    "qwen3-30b-a3b": (30.5, 128, 8, (768, 2048), 48),
    "gpt-oss-20b": (20.9, 32, 4, (2880, 2880), 24),
    "olmoe-1b-7b": (6.9, 64, 8, (1024, 2048), 16),
    "deepseek-v2-lite": (15.7, 64, 6, (1408, 2048), 26),
    "qwen1.5-moe-a2.7b": (14.3, 60, 4, (1408, 2048), 24),
    "phi-3.5-moe": (41.9, 16, 2, (6400, 4096), 32),
}
# Small enough group sizes for the tiny models' widths (16 and 32).
TINY_QUANT = QuantConfig(4, 4, attn_group_size=16, expert_group_size=16)


@pytest.mark.parametrize("name", sorted(FAMILY_PRESETS))
def test_presets_are_the_published_models(name):
    total, E, k, (i, h), moe_layers = PUBLISHED[name]
    cfg = preset_config(name)
    ad = adapter_for(cfg)
    assert type(cfg).__name__ == ad.config_name
    with torch.device("meta"):
        model = ad.model_class()(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e9 - total) < 0.06, params
    assert (ad.num_experts(cfg), ad.top_k(cfg), ad.num_layers(cfg)) == (E, k, moe_layers)
    assert ad.expert_shapes(cfg)["w1"] == (i, h) and ad.expert_shapes(cfg)["w2"] == (h, i)
    # 16-bit estimate = every parameter in 16 bits (GPT-OSS: + the 64-byte alignment of nothing)
    assert moe_colab.estimate_size(cfg, None) == 2 * params


@pytest.mark.parametrize("name", sorted(FAMILY_PRESETS))
def test_every_preset_has_a_t4_plan_or_a_reason(name):
    """A free T4 (15 GiB device, 12.7 GB host): each preset plans at 4-bit experts or is refused
    with the numbers, what would fit, and the pointer to docs/scaling.md."""
    from moe_colab.planner import PlanError
    try:
        p = moe_colab.plan(name, "attn4-exp4", **COLAB_T4)
    except PlanError as e:
        assert "what would fit instead" in str(e) and "docs/scaling.md" in str(e)
        return
    _, E, k, _, L = PUBLISHED[name]
    assert (p.num_experts, p.top_k, p.num_layers) == (E, k, L) and p.fits and k <= p.experts_on_device <= E


def test_qwen3_30b_a3b_at_4bit_swaps_about_100_of_128_experts_on_a_t4():
    p = moe_colab.plan("qwen3-30b-a3b", "attn4-exp4", **COLAB_T4)
    assert p.swap and 90 <= p.experts_on_device < 128
    assert 2.2 * 2**20 < p.expert_bytes < 2.6 * 2**20            # ~2.5 MB per expert at 4.25 bits
    assert moe_colab.plan("Qwen/Qwen3-30B-A3B", "attn4-exp4", **COLAB_T4).experts_on_device == p.experts_on_device


def trunk_bytes_of(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quant_buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                        if ".self_attn." in n and "rotary" not in n)
    persistent = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "e_score_correction" in n)
    return params + quant_buffers + persistent


PLAN_CASES = ["qwen3-L3-E8-k2-dense0-sharded", "qwen2-L4-E4-k2-step2-sharded", "dsv3-L4-E8-k2-sharded",
              "gptoss-L2-E8-k2", "phimoe-L2-E8-biases", "olmoe-L2-E8-k2", "dsv2-L3-E8-k3-grouped-sharded"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("famplan")
    return {n: write_family_checkpoint(root / n, FAMILY_CHECKPOINTS[n], seed=3) for n in PLAN_CASES}


@pytest.mark.parametrize("name", PLAN_CASES)
@pytest.mark.parametrize("quant,swap,dtype", [(None, False, torch.float32), (TINY_QUANT, True, torch.float32),
                                              (None, True, torch.bfloat16)])
def test_plan_matches_what_the_engine_allocates(ckpts, name, quant, swap, dtype):
    path = ckpts[name]
    p = moe_colab.plan(path, quant, device="cpu", dtype=dtype, host_bytes=64 * GiB, swap=swap, experts_on_device=3)
    model = moe_colab.load_model(path, device="cpu", dtype=dtype, prefetch=0, progress=False, **p.load_kwargs())
    cache = model.moe_cache
    ad = adapter_for(model.config)
    assert p.num_layers == ad.num_layers(model.config) == cache.store.num_layers
    assert cache.experts_on_device == 3 and cache.store.swap == swap
    assert cache.store.nbytes == p.expert_bytes
    assert cache.device_bytes == p.cache_bytes
    assert cache.store.host_bytes == p.host_expert_bytes
    assert trunk_bytes_of(model) == p.trunk_bytes


@pytest.mark.parametrize("name", PLAN_CASES)
def test_kv_cache_bytes_match_transformers(ckpts, name):
    model = moe_colab.load_model(ckpts[name], device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=0,
                                 progress=False)
    out = model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = getattr(out, "cache", None) or out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv_cache_bytes(model.config, torch.float32, cache.get_seq_length())


@pytest.mark.parametrize("name", ["qwen2-L4-E4-k2-step2-sharded", "dsv3-L4-E8-k2-sharded", "gptoss-L2-E8-k2",
                                  "phimoe-L2-E8-biases"])
def test_estimate_equals_the_bytes_quantize_writes(ckpts, name, tmp_path):
    from safetensors import safe_open
    ck = ckpts[name]
    dst = moe_colab.quantize(ck, tmp_path / "q", TINY_QUANT, progress=False, device="cpu", dtype=torch.float16)
    stored = 0
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                stored += t.numel() * (2 if t.dtype == torch.float32 else t.element_size())
    config = adapter_for(FAMILY_CHECKPOINTS[name][0]).config_class().from_pretrained(ck)
    assert moe_colab.estimate_size(config, TINY_QUANT) == stored


def _dequantized_reference(path, spec, qdir):
    """transformers' own class with every routed expert replaced by the quantized directory's
    dequantized matrices (and biases): what a correct low-bit engine must compute."""
    from moe_colab.convert import manifest as qm
    from moe_colab.quant.packing import dequantize
    ref = reference(path, spec)
    manifest, qcfg = qm.open_quantized(qdir)
    fmt = qm.expert_format_for(manifest, torch.float32)
    ad = adapter_for(ref.config)
    bits, g, sg = qcfg.matrix("expert")
    with torch.no_grad():
        for l, layer in enumerate(ad.moe_decoder_layers(ref)):
            buf = qm.load_layer_experts(qdir, manifest, l)
            experts = ad.moe_block(layer).experts
            for e in range(buf.shape[0]):
                mats = fmt.matrices(fmt.layout.views(buf[e]))
                w = {n: dequantize(mats[n], bits, g, sg, fmt.shapes[n], torch.float32) for n in ("w1", "w2", "w3")}
                if spec[0] == "gpt_oss":      # [in, out], gate/up interleaved, + biases
                    gu = torch.empty_like(experts.gate_up_proj[e])
                    gu[:, 0::2], gu[:, 1::2] = w["w1"].t(), w["w3"].t()
                    experts.gate_up_proj[e] = gu
                    experts.down_proj[e] = w["w2"].t()
                else:
                    experts.gate_up_proj[e] = torch.cat([w["w1"], w["w3"]])
                    experts.down_proj[e] = w["w2"]
    return ref


@pytest.mark.parametrize("name", ["qwen3-L3-E8-k2-dense0-sharded", "qwen2-L4-E4-k2-step2-sharded",
                                  "dsv3-L4-E8-k2-sharded", "gptoss-L2-E4-k2-mxfp4-sharded"])
def test_quantized_experts_match_transformers_with_the_same_weights(name, tmp_path):
    """quantize() (4-bit experts, 16-bit attention) then load_model: token-identical with the
    family's transformers class holding the dequantized experts, for a small cache with prefetch
    and swap; load-time quantization gives the very same bits as the directory."""
    spec = FAMILY_CHECKPOINTS[name]
    ck = write_family_checkpoint(tmp_path / "ck", spec, seed=5)
    q = QuantConfig(16, 4, expert_group_size=16)
    qdir = moe_colab.quantize(ck, tmp_path / "q", q, progress=False, device="cpu")
    ref = _dequantized_reference(ck, spec, qdir)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(device="cpu", dtype=torch.float32, progress=False, experts_on_device=2, prefetch=1, swap=True)
    model = moe_colab.load_model(qdir, **kw)
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    a, b = ref.generate(ids, **gen), model.generate(ids, **gen)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-4, rtol=0)
    at_load = moe_colab.load_model(ck, quant=q, **kw).generate(ids, **gen)
    assert torch.equal(at_load.sequences, b.sequences) and torch.equal(torch.stack(at_load.logits),
                                                                       torch.stack(b.logits))
    # really quantized: the 16-bit model differs
    full = reference(ck, spec)(ids).logits
    assert not torch.allclose(full, ref(ids).logits, atol=1e-4)


@pytest.mark.parametrize("name", ["dsv2-L3-E8-k2-greedy", "gptoss-L2-E8-k2"])
def test_quantized_attention_of_the_family(name, tmp_path):
    """4-bit attention: DeepSeek's MLA projections (q, kv_a, kv_b, o) and GPT-OSS's biased ones
    become QuantLinear; the directory loads to the same bits as quantizing at load time."""
    spec = FAMILY_CHECKPOINTS[name]
    ck = write_family_checkpoint(tmp_path / "ck", spec, seed=6)
    qdir = moe_colab.quantize(ck, tmp_path / "q", TINY_QUANT, progress=False, device="cpu")
    kw = dict(device="cpu", dtype=torch.float32, progress=False, experts_on_device=2, prefetch=1)
    a, b = moe_colab.load_model(qdir, **kw), moe_colab.load_model(ck, quant=TINY_QUANT, **kw)
    from moe_colab.quant.format import QuantLinear
    ad = adapter_for(a.config)
    for layer in a.model.layers:
        for proj in ad.attention_projections(a.config):
            assert isinstance(getattr(layer.self_attn, proj), QuantLinear), proj
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb) and torch.isfinite(la).all()
    assert math.isclose(moe_colab.plan(qdir, device="cpu", host_bytes=8 * GiB).expert_bytes,
                        a.moe_cache.store.nbytes)
