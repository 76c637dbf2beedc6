"""The rest of the package on families beyond Mixtral: the command line, routing traces, the cache
simulator against the engine's own counters, prefetch recall and the widgets."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moe_colab
from conftest import write_tokenizer
from families import FAMILY_CHECKPOINTS, write_family_checkpoint
from moe_colab.adapters import adapter_for

CASES = ["qwen3-L3-E8-k2-dense0-sharded", "dsv3-L4-E8-k2-sharded", "gptoss-L2-E8-k2", "dsv2-L3-E8-k3-grouped-sharded"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("famtools")
    out = {}
    for n in CASES:
        family, over, shard, layout = FAMILY_CHECKPOINTS[n]
        # a byte-level tokenizer needs more than 256 ids
        path = write_family_checkpoint(root / n, (family, {**over, "vocab_size": 300}, shard, layout), seed=8)
        write_tokenizer(path, 300)
        out[n] = path
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_colab", *args], capture_output=True, text=True, timeout=300)


def test_cli_generates_plans_and_quantizes_a_family(ckpts, tmp_path):
    ck = ckpts["qwen3-L3-E8-k2-dense0-sharded"]
    r = run_cli("generate", "--model", str(ck), "--prompt", "def f(x):", "--max-new-tokens", "6", "--device", "cpu",
                "--experts-on-device", "3", "--prefetch", "2")
    assert r.returncode == 0, r.stderr
    assert "def f(x):" in r.stdout and "tokens/s" in r.stdout
    r = run_cli("plan", "qwen3-30b-a3b", "--quant", "attn4-exp4", "--device-bytes", "15GiB", "--host-bytes", "12.7GB")
    assert r.returncode == 0, r.stderr
    assert "of 128 experts per layer" in r.stdout and "swap mode" in r.stdout
    r = run_cli("quantize", str(ckpts["gptoss-L2-E8-k2"]), str(tmp_path / "q"), "--quant", "16,4", "--device", "cpu",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "q"), "--prompt", "for i in", "--max-new-tokens", "4",
                "--device", "cpu", "--experts-on-device", "2", "--swap")
    assert r.returncode == 0, r.stderr and "for i in" in r.stdout


@pytest.mark.parametrize("name", CASES)
def test_simulator_reproduces_the_engine_counters(ckpts, name):
    """A trace recorded on the offloaded model, replayed by simulate_cache without prefetch, counts
    exactly the hits and misses the engine counted while it was recorded (one layer per MoE layer)."""
    from moe_colab.analysis.simulate import simulate_cache
    model = moe_colab.load_model(ckpts[name], device="cpu", dtype=torch.float32, experts_on_device=3, prefetch=0,
                                 progress=False)
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    model.reset_offload_stats()
    # one token at a time, as a decoding engine routes them
    trace = moe_colab.record_routing(model, ids[:, :1], max_new_tokens=12)
    stats = model.offload_stats()
    sim = simulate_cache(trace, 3, "lru")
    assert trace.num_layers == adapter_for(model.config).num_layers(model.config)
    assert (sim["hits"], sim["misses"]) == (stats["hits"], stats["misses"])


@pytest.mark.parametrize("name", CASES)
def test_prefetch_recall_and_widgets(ckpts, name):
    from transformers import AutoTokenizer

    from moe_colab.analysis.prefetch_recall import prefetch_recall
    from moe_colab.notebook import widgets as W
    tok = AutoTokenizer.from_pretrained(ckpts[name])
    model = moe_colab.load_model(ckpts[name], device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=1,
                                 progress=False)
    ids = tok("for i in range(10):\n    print(i)", return_tensors="pt").input_ids
    r = prefetch_recall(model, ids, ahead=(0, 1), source="before")
    k = adapter_for(model.config).top_k(model.config)
    assert r["recall"][0, k - 1] == pytest.approx(1.0)       # 0 layers ahead, "before": the router itself
    trace = moe_colab.record_routing(model, ids, tokenizer=tok)
    fig = W.routing_figure(trace)
    assert len(fig.layout.xaxis.ticktext) == ids.shape[1]
    ev = W.cache_events(trace, 2, "lru")
    assert ev.hits.sum() == moe_colab.simulate_cache(trace, 2, "lru")["hits"]


@pytest.mark.parametrize("name", ["qwen2-L4-E4-k2-step2-sharded", "gptoss-L2-E4-k2-mxfp4-sharded"])
def test_shard_by_shard_from_the_hub_equals_quantize(name, tmp_path):
    """quantize_from_hub (one shard at a time; MXFP4 blocks and scales may sit in different
    shards) writes exactly what quantize() writes from the whole local checkpoint."""
    from test_hub import FakeHub, assert_same_quantization

    from moe_colab.convert.hub import quantize_from_hub
    from moe_colab.quant.config import QuantConfig
    ck = write_family_checkpoint(tmp_path / "ck", FAMILY_CHECKPOINTS[name], seed=4)
    q = QuantConfig(16, 4, expert_group_size=16)
    ref = moe_colab.quantize(ck, tmp_path / "ref", q, progress=False, device="cpu")
    hub = FakeHub(ck, tmp_path / "scratch")
    dst = quantize_from_hub("someone/family", tmp_path / "q", q, fetch=hub, device="cpu", progress=False)
    assert len(hub.fetched) >= 2 and max(hub.on_disk) == 1
    assert_same_quantization(dst, ref)
