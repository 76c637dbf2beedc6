"""Every supported family against transformers' own class (the oracle), on CPU in float32.

For each tiny checkpoint of tests/families.py (Qwen3-MoE, Qwen2-MoE, OLMoE, PhiMoE, DeepSeek-V2,
DeepSeek-V3, GPT-OSS; several shapes, sharded and not, per-expert, fused and MXFP4 layouts): greedy
generation (batch 1 and a left-padded batch of 3) gives the same tokens as the family's
transformers class for every cache size 1..E, prefetch counts from 0 to E and both copy and swap
mode; logits agree to 1e-5; the cache's counters account for every expert use; and the logits are
bitwise the same whatever was cached, prefetched or swapped. Dense layers and shared experts stay
in the trunk, never in the expert store.
"""
from __future__ import annotations

import pytest
import torch

import moe_colab
from families import FAMILY_CHECKPOINTS, family_model, reference, write_family_checkpoint
from moe_colab.adapters import adapter_for

NEW_TOKENS = 10
NAMES = list(FAMILY_CHECKPOINTS)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_family_checkpoint(root / name, spec, seed=i)
            for i, (name, spec) in enumerate(FAMILY_CHECKPOINTS.items())}


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    single = torch.randint(3, vocab, (1, 7), generator=g)
    lengths = [8, 3, 5]
    batch = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, n in enumerate(lengths):
        batch[row, -n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, -n:] = 1
    return [(single, torch.ones_like(single)), (batch, mask)]


def greedy(model, ids, mask, new=NEW_TOKENS):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


class ExpertUses:
    """Distinct experts per router call and MoE layer, counted on the reference model."""

    def __init__(self, model):
        ad = adapter_for(model.config)
        self.uses = 0
        self.handles = [ad.router(ad.moe_block(layer)).register_forward_hook(self._hook)
                        for layer in ad.moe_decoder_layers(model)]

    def _hook(self, module, args, out):
        self.uses += len(set(out[2].reshape(-1).tolist()))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def references(family_checkpoints):
    refs = {}
    for name, path in family_checkpoints.items():
        ref = reference(path, FAMILY_CHECKPOINTS[name])
        runs = []
        for ids, mask in prompts(ref.config.vocab_size):
            counter = ExpertUses(ref)
            seq, logits = greedy(ref, ids, mask)
            counter.remove()
            runs.append((ids, mask, seq, logits, counter.uses))
        refs[name] = runs
    return refs


def load(path, **kw):
    return moe_colab.load_model(path, device="cpu", dtype=torch.float32, progress=False, **kw)


def grid(experts: int):
    """(experts_on_device, prefetch, swap): every cache size; every prefetch count up to 4 experts,
    else 0, 1, 3 and E; half the grid in swap mode."""
    prefetches = range(experts + 1) if experts <= 4 else (0, 1, 3, experts)
    return [(k, p, (k + p) % 2 == 1) for k in range(1, experts + 1) for p in prefetches]


@pytest.mark.parametrize("name", NAMES)
def test_moe_layers_are_transformers_own(name):
    """adapter.moe_layers lists exactly the decoder layers whose MLP transformers builds as an
    MoE block; the others are dense."""
    config, model = family_model(FAMILY_CHECKPOINTS[name])
    ad = adapter_for(config)
    built = [l for l, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert ad.moe_layers(config) == built
    assert ad.num_experts(config) == model.model.layers[built[0]].mlp.experts.gate_up_proj.shape[0]


@pytest.mark.parametrize("name", NAMES)
def test_token_identical_for_every_cache_size_and_prefetch(name, family_checkpoints, references):
    path = family_checkpoints[name]
    config = adapter_for(FAMILY_CHECKPOINTS[name][0]).config_class().from_pretrained(path)
    experts = adapter_for(config).num_experts(config)
    for on_device, prefetch, swap in grid(experts):
        model = load(path, experts_on_device=on_device, prefetch=prefetch, swap=swap)
        for ids, mask, ref_seq, ref_logits, uses in references[name]:
            model.reset_offload_stats()
            seq, logits = greedy(model, ids, mask)
            where = f"{name} experts_on_device={on_device} prefetch={prefetch} swap={swap} batch={ids.shape[0]}"
            assert torch.equal(seq, ref_seq), where
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=where)
            stats = model.offload_stats()
            assert stats["hits"] + stats["misses"] == uses, where
            assert stats["prefetch_hits"] <= stats["prefetches"], where
            if prefetch == 0:
                assert stats["prefetches"] == 0, where
            if not swap:
                assert stats["bytes_to_host"] == 0, where


@pytest.mark.parametrize("name", NAMES)
def test_logits_bitwise_equal_across_paths(name, family_checkpoints):
    """The same bits whatever was cached, prefetched, copied or swapped."""
    path = family_checkpoints[name]
    spec = FAMILY_CHECKPOINTS[name]
    E = adapter_for(spec[0]).num_experts(family_model(spec)[0])
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    outs = [greedy(load(path, experts_on_device=k, prefetch=p, swap=s), ids, torch.ones_like(ids))
            for k, p, s in [(E, 0, False), (1, 0, False), (2, 1, True), (E - 1, 2, True)]]
    for seq, logits in outs[1:]:
        assert torch.equal(seq, outs[0][0]) and torch.equal(logits, outs[0][1])


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILY_CHECKPOINTS[n][0] in ("qwen2_moe", "deepseek_v2",
                                                                                   "deepseek_v3", "qwen3_moe")])
def test_dense_layers_and_shared_experts_stay_in_the_trunk(name, family_checkpoints):
    path = family_checkpoints[name]
    model = load(path, experts_on_device=1, prefetch=0)
    ad = adapter_for(model.config)
    moe = ad.moe_layers(model.config)
    store = model.moe_cache.store
    assert store.num_layers == len(moe) and len(model.moe_cache.layers) == len(moe)
    for l, layer in enumerate(model.model.layers):
        block = layer.mlp
        if l in moe:
            assert type(block).__name__ == "OffloadedMoE" and block.layer_idx == moe.index(l)
            for attr in ad.kept_attrs:        # shared experts: ordinary modules with their weights
                kept = getattr(block, attr)
                assert all(p.device.type == "cpu" and p.abs().sum() > 0 for p in kept.parameters())
        else:
            assert type(block).__name__.endswith("MLP") and not hasattr(block, "experts")
    # the store holds routed experts only: E per MoE layer, of the routed width
    fn = ad.expert_fn(model.config)
    assert store.nbytes == 3 * fn.hidden * fn.intermediate * 4


@pytest.mark.parametrize("name", ["qwen3-L3-E8-k2-dense0-sharded", "dsv3-L4-E8-k2-sharded", "gptoss-L2-E8-k2",
                                  "phimoe-L2-E4-jitter05-sharded"])
def test_record_routing_matches_the_reference(name, family_checkpoints):
    """record_routing hooks the family's router (mlp.router for PhiMoE and GPT-OSS) of every MoE
    layer, on the offloaded model as on transformers' own."""
    path = family_checkpoints[name]
    ref = reference(path, FAMILY_CHECKPOINTS[name])
    model = load(path, experts_on_device=2, prefetch=1)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    a = moe_colab.record_routing(ref, ids, max_new_tokens=5)
    b = moe_colab.record_routing(model, ids, max_new_tokens=5)
    assert a.num_layers == b.num_layers == adapter_for(model.config).num_layers(model.config)
    assert a.num_experts == b.num_experts
    assert torch.equal(a.experts, b.experts) and torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.weights, b.weights, atol=1e-6, rtol=0)
    from moe_colab.analysis.simulate import simulate_cache
    sim = simulate_cache(b, 2)
    assert sim is not None


def test_unsupported_model_type_is_refused_everywhere(tmp_path):
    """load_model, plan and estimate_size refuse a model_type without an adapter alike, naming the
    supported families and docs/adapters.md."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "hidden_size": 8}))
    from transformers import LlamaConfig
    for call in (lambda: load(tmp_path), lambda: moe_colab.plan(tmp_path, device="cpu", host_bytes=2**30),
                 lambda: moe_colab.estimate_size(LlamaConfig())):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "not a supported MoE model" in msg and "docs/adapters.md" in msg
        assert all(t in msg for t in ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v2", "olmoe", "phimoe"))
