"""The offloaded model against transformers' own Mixtral (the oracle), on CPU in float32.

For every cache size 1..E and prefetch count 0..E, greedy generation (batch 1 and a padded
batch of 3) must give the same tokens as MixtralForCausalLM.from_pretrained, logits must agree
to 1e-5, and the cache statistics must account for every expert use.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

import moe_colab
from conftest import CHECKPOINTS

NEW_TOKENS = 32


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    single = torch.randint(3, vocab, (1, 7), generator=g)
    # Three prompts of different lengths, left-padded as generate() expects.
    lengths = [9, 4, 6]
    batch = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, n in enumerate(lengths):
        batch[row, -n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, -n:] = 1
    return [(single, torch.ones_like(single)), (batch, mask)]


def greedy(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


class RoutingCounter:
    """Counts expert uses in the reference model: per forward and layer, the distinct experts."""

    def __init__(self, model):
        self.uses, self.distinct = 0, set()
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, layer):
        def hook(module, args, out):
            experts = set(out[2].reshape(-1).tolist())
            self.uses += len(experts)
            self.distinct |= {(layer, e) for e in experts}
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def references(checkpoints):
    refs = {}
    for name, path in checkpoints.items():
        ref = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
        runs = []
        for ids, mask in prompts(ref.config.vocab_size):
            counter = RoutingCounter(ref)
            seq, logits = greedy(ref, ids, mask)
            counter.remove()
            runs.append((ids, mask, seq, logits, counter.uses, counter.distinct))
        refs[name] = runs
    return refs


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_token_identical_for_every_cache_size_and_prefetch(name, checkpoints, references):
    experts = CHECKPOINTS[name]["experts"]
    for on_device in range(1, experts + 1):
        for prefetch in range(0, experts + 1):
            swap = (on_device + prefetch) % 2 == 1      # half the grid in swap mode
            model = moe_colab.load_model(checkpoints[name], device="cpu", dtype=torch.float32,
                                         experts_on_device=on_device, prefetch=prefetch, swap=swap,
                                         progress=False)
            for ids, mask, ref_seq, ref_logits, uses, distinct in references[name]:
                model.reset_offload_stats()
                seq, logits = greedy(model, ids, mask)
                where = f"{name} experts_on_device={on_device} prefetch={prefetch} swap={swap} batch={ids.shape[0]}"
                assert torch.equal(seq, ref_seq), where
                torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=where)
                stats = model.offload_stats()
                assert stats["hits"] + stats["misses"] == uses, where
                assert stats["prefetch_hits"] <= stats["prefetches"], where
                if prefetch == 0:
                    assert stats["prefetches"] == stats["prefetch_hits"] == 0, where
                if not swap:
                    assert stats["bytes_to_host"] == 0, where
            if swap:
                assert model.moe_cache.store.host_bytes == (experts - on_device + 1) * len(
                    model.moe_cache.layers) * model.moe_cache.store.nbytes


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_all_experts_on_device_means_one_miss_per_expert(name, checkpoints, references):
    experts = CHECKPOINTS[name]["experts"]
    model = moe_colab.load_model(checkpoints[name], device="cpu", dtype=torch.float32,
                                 experts_on_device=experts, prefetch=0, progress=False)
    for ids, mask, ref_seq, _, uses, distinct in references[name]:
        model.moe_cache.clear()
        model.reset_offload_stats()
        greedy(model, ids, mask)
        stats = model.offload_stats()
        assert stats["misses"] == len(distinct)
        assert stats["hits"] == uses - len(distinct)
        expert_bytes = model.moe_cache.store.nbytes
        assert stats["bytes_to_device"] == len(distinct) * expert_bytes


def test_sampling_matches_reference_with_same_seed(small_checkpoint):
    ref = MixtralForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32)
    model = moe_colab.load_model(small_checkpoint, device="cpu", dtype=torch.float32,
                                 experts_on_device=2, prefetch=1, progress=False)
    ids = torch.tensor([[5, 9, 17, 33]])
    outs = []
    for m in (ref, model):
        torch.manual_seed(123)
        outs.append(m.generate(ids, max_new_tokens=20, do_sample=True, top_k=0, temperature=1.0,
                               pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_past_key_values_reused_across_calls(small_checkpoint):
    ref = MixtralForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32)
    model = moe_colab.load_model(small_checkpoint, device="cpu", dtype=torch.float32,
                                 experts_on_device=1, prefetch=2, progress=False)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    results = []
    for m in (ref, model):
        first = m.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                           pad_token_id=0)
        cont = torch.cat([first.sequences, torch.tensor([[7, 9]])], dim=1)
        second = m.generate(cont, past_key_values=first.past_key_values, max_new_tokens=6,
                            do_sample=False, pad_token_id=0)
        results.append(second)
    assert torch.equal(results[0], results[1])


def test_streamer_receives_tokens(small_checkpoint):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    model = moe_colab.load_model(small_checkpoint, device="cpu", dtype=torch.float32, progress=False,
                                 experts_on_device=2, prefetch=0)
    streamer = Collect()
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, streamer=streamer, pad_token_id=0)
    assert streamer.ended
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks])
    assert torch.equal(streamed, out.reshape(-1))


def test_logits_bitwise_equal_across_paths_on_cpu(checkpoints):
    """Stricter than the tolerance above: the same bits whatever was cached, prefetched, copied
    or swapped (the partial outputs are added in a fixed order)."""
    path = checkpoints["L2-E6-k3-gqa4-sharded"]
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    outs = []
    for k, prefetch, swap in [(6, 0, False), (1, 0, False), (2, 3, False), (3, 1, True), (4, 2, True)]:
        model = moe_colab.load_model(path, device="cpu", dtype=torch.float32, experts_on_device=k,
                                     prefetch=prefetch, swap=swap, progress=False)
        outs.append(greedy(model, ids, torch.ones_like(ids)))
    for seq, logits in outs[1:]:
        assert torch.equal(seq, outs[0][0]) and torch.equal(logits, outs[0][1])
