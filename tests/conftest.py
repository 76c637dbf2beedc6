"""Shared fixtures: tiny random Mixtral checkpoints written by transformers' save_pretrained.

They use the original Mixtral layout (per-expert w1/w2/w3, optionally sharded with an index),
exactly what the Hub serves, so the loader is tested on real layouts without any download.
"""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MOE_COLAB_TEST_THREADS", "1")))


def write_checkpoint(path, *, layers=2, experts=4, top_k=2, heads=4, kv_heads=2, hidden=32,
                     intermediate=64, vocab=128, shard_size=None, seed=0, tokenizer=False):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=256,
                        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    # Default init gives near-uniform routers; sharper routers make routing (and so caching)
    # depend on the input, as in a trained model.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        write_tokenizer(path, vocab)
    return path


def write_tokenizer(path, vocab):
    """A byte-level BPE tokenizer with ``vocab`` entries, trained on a few lines of Python."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n"] * 20
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


# Layer counts, expert counts, top-k, GQA ratios (heads/kv_heads), sharded and unsharded.
CHECKPOINTS = {
    "L2-E4-k2-gqa2-sharded": dict(layers=2, experts=4, top_k=2, heads=4, kv_heads=2, shard_size="40KB"),
    "L3-E3-k1-mha": dict(layers=3, experts=3, top_k=1, heads=4, kv_heads=4, seed=1),
    "L2-E6-k3-gqa4-sharded": dict(layers=2, experts=6, top_k=3, heads=8, kv_heads=2, hidden=64,
                                  shard_size="60KB", seed=2),
    "L1-E8-k2-mqa": dict(layers=1, experts=8, top_k=2, heads=4, kv_heads=1, seed=3),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, **kw) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="session")
def small_checkpoint(checkpoints):
    return checkpoints["L2-E4-k2-gqa2-sharded"]
