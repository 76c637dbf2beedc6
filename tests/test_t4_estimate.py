"""The arithmetic of the compute-aware T4 estimate (moe_colab/bench/t4_estimate.py): checked against
hand-computed values and invariants, never against the numbers it printed once."""
from __future__ import annotations

import math

import pytest

from moe_colab.bench import t4_estimate as E

H200, T4 = E.GPUS["H200"], E.GPUS["T4"]


def test_kernel_time_takes_the_slower_resource():
    # memory-bound: 320 MB at the T4's 320 GB/s is 1 ms, whatever the H200 took
    r = E.kernel_ms(0.01, 320e6, H200, T4)
    assert math.isclose(r["ms"], 1.0) and r["bound"] == "memory"
    assert math.isclose(r["compute_ms"], 0.01 * 67.0 / 8.1)
    # compute-bound: nothing to move, the H200 time scaled by the FP32 ratio
    r = E.kernel_ms(0.2, 0.0, H200, T4)
    assert math.isclose(r["ms"], 0.2 * 67.0 / 8.1) and r["bound"] == "compute"
    # the H200 reaching half its peak derates the T4's bandwidth alike: twice the memory time
    assert math.isclose(E.kernel_ms(0.0, 320e6, H200, T4, src_measured_GBps=2400)["memory_ms"], 2.0)
    assert math.isclose(E.kernel_ms(0.0, 320e6, H200, T4, src_measured_GBps=9999)["memory_ms"], 1.0)  # capped at 1
    with pytest.raises(ValueError):
        E.kernel_ms(-1.0, 0, H200)


def test_layer_overlaps_copies_with_hits_only():
    # 2 experts, half of them hits: the hit (1 ms) hides under 3 ms of copies, the miss follows
    assert math.isclose(E.layer_ms(1.0, top_k=2, hit_ratio=0.5, copy_ms=3.0), 3.0 + 1.0)
    # the hit's compute longer than the copies: it sets the pace
    assert math.isclose(E.layer_ms(5.0, top_k=2, hit_ratio=0.5, copy_ms=3.0), 5.0 + 5.0)
    assert math.isclose(E.layer_ms(2.0, top_k=2, hit_ratio=1.0, copy_ms=0.0), 4.0)
    assert math.isclose(E.layer_ms(2.0, top_k=2, hit_ratio=0.0, copy_ms=1.0), 1.0 + 4.0)
    with pytest.raises(ValueError):
        E.layer_ms(1.0, top_k=2, hit_ratio=1.5, copy_ms=0.0)


def test_free_compute_gives_back_the_transfer_only_estimate():
    b = 2.5e9
    t = E.token_ms(0.0, layers=32, top_k=2, hit_ratio=0.87, copy_bytes_per_token=b)
    assert math.isclose(1e3 / t, E.transfer_only_tokens_per_s(b))
    assert math.isclose(E.transfer_only_tokens_per_s(b), 12e9 / b)
    slower = E.token_ms(1.0, layers=32, top_k=2, hit_ratio=0.87, copy_bytes_per_token=b, trunk_ms=5.0)
    assert slower > t + 5.0


def test_trunk_counts_attention_weights_and_the_lm_head():
    t = E.trunk_ms(layers=2, hidden=4, kv_dim=2, vocab=10, attn_ms_per_weight=0.5, dst=T4)
    assert math.isclose(t, 2 * (2 * 16 + 2 * 8) * 0.5 + 10 * 4 * 2 / 320e9 * 1e3)


def test_gpu_names():
    assert E.gpu_named("NVIDIA H200") is H200 and E.gpu_named("Tesla T4") is T4
    assert E.gpu_named("NVIDIA H100 80GB HBM3") is E.GPUS["H100"] and E.gpu_named("Quadro P1000") is None


def _kernels_json(ms):
    variants = {v: {"graph_ms": t, "bytes_moved": 100e6} for v, t in ms.items()}
    return {"ran_on": "NVIDIA H200", "device_bandwidth_GBps": 4000.0,
            "experts": {"2": {"weights": 1e8, "variants": variants}, "4": {"weights": 1e8, "variants": variants}}}


BENCH = {"settings": {"model": {"num_hidden_layers": 32, "num_experts_per_tok": 2, "hidden_size": 4096,
                                "vocab_size": 32000}},
         "quants": {"paper-2bit": {"rows": {"full": {"bytes_per_token": 2.5e9, "hit_ratio": 0.87,
                                                     "decode_tokens_per_s": 11.0}}}}}


def test_token_table_and_markdown():
    kj = _kernels_json({"fused_sm75": 0.2, "fallback_cuda": 0.3, "reference": 3.0})
    (row,) = E.token_table(kj, BENCH)
    assert row["scheme"] == "paper-2bit" and row["bits"] == 2 and row["trunk_ms"] > 0
    v = row["variants"]
    # compute only adds time: every estimate is below the transfer-only one, slower kernels lower
    assert row["transfer_only_tokens_per_s"] > v["fused_sm75"]["tokens_per_s"] > v["reference"]["tokens_per_s"]
    assert v["fused_sm75"]["tokens_per_s"] >= v["fallback_cuda"]["tokens_per_s"]
    expert = E.kernel_ms(3.0, 100e6, H200, T4, 4000.0)["ms"]
    assert math.isclose(v["reference"]["expert_ms"], expert)
    assert math.isclose(v["reference"]["token_ms"], E.token_ms(expert, layers=32, top_k=2, hit_ratio=0.87,
                                                                copy_bytes_per_token=2.5e9, trunk_ms=row["trunk_ms"]))
    md = "\n".join(E.markdown(kj, BENCH))
    assert "paper-2bit" in md and "Assumptions" in md and E.LABELS["fallback_cuda"] in md
    assert "No kernel measurements" in "\n".join(E.markdown(None, BENCH))
