"""The benchmark (moe_colab.bench.run): the whole path on CPU at tiny scale, and its parts.

The CPU run is the real code path: synthetic quantized experts in an ExpertStore, the engine's
OffloadedMoE/ExpertCache rows, accelerate's offload hooks (to disk on a CPU-only machine), the
profiler, JSON/markdown/SVG. Timings on CPU mean nothing; the counters and tokens do.
"""
from __future__ import annotations

import json
import tempfile
import xml.etree.ElementTree as ET

import pytest
import torch

from moe_colab.bench import run as bench
from moe_colab.bench.replay import (ReplayRouting, chance_overlap, consecutive_overlap, make_routing,
                                     synthetic_experts, table5_overlap)
from moe_colab.bench.synthetic import bench_config, build_offloaded, fill_quant_, generator, make_store
from moe_colab.config import OffloadOptions
from moe_colab.quant.config import resolve_quant
from moe_colab.quant.packing import dequantize, tensor_shapes

TINY = ["--device", "cpu", "--scale", "tiny", "--prompts", "4,8", "--decode-tokens", "3", "--runs", "1",
        "--naive-decode-tokens", "2", "--bandwidth-mb", "1", "--profile-tokens", "2", "--max-minutes", "5"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rc = bench.main(TINY + ["--quant", "both", "--profile", "--out", str(root / "docs"),
                            "--results-dir", str(root / "benchmarks"), "--name", "t"])
    return rc, root, json.loads((root / "benchmarks" / "bench_t.json").read_text())


def test_cpu_run_all_rows(cpu_run):
    rc, root, res = cpu_run
    assert rc == 0
    cfg = bench_config("tiny")
    L, k = cfg.num_hidden_layers, cfg.num_experts_per_tok
    for qname in ("paper-2bit", "paper-3bit"):
        q = res["quants"][qname]
        rows = q["rows"]
        assert set(rows) == {"full", "no_prefetch", "no_cache", "naive", "full_swap", "colab", "colab_no_prefetch",
                             "colab_copy"}
        for name, r in rows.items():
            assert "error" not in r, (qname, name, r.get("error"))
            assert r["decode_tokens_per_s"] > 0 and r["decoded_tokens"] == 2 * (2 if name == "naive" else 3)
            # Every row computes the same weights on the same replayed routing.
            assert r["same_tokens_as_full"] == 1.0, (qname, name)
        nb = q["expert_bytes"]
        # No cache: each decoded token copies exactly its k experts in every layer.
        assert rows["no_cache"]["hit_ratio"] == 0
        assert rows["no_cache"]["bytes_per_token"] == L * k * nb
        assert rows["no_prefetch"]["decode_counters"]["prefetches"] == 0
        assert rows["no_prefetch"]["prefetch_recall"] == 0
        assert rows["full"]["decode_counters"]["prefetches"] > 0
        assert rows["full"]["bytes_per_token"] <= rows["no_cache"]["bytes_per_token"] + L * 2 * nb
        # Naive: accelerate loaded the offloaded modules once per forward; counted per call.
        nv = rows["naive"]
        assert nv["offload_tier"] == "disk" and nv["offloaded_modules"]
        assert nv["bytes_per_token"] == nv["offloaded_bytes_per_forward"]
        assert q["profile"]["tokens"] == 2 and q["profile"]["table"]
        # The colab rows run the planner's choice for a free T4 (tiny fits whole: copy mode there).
        plan = q["colab_plan"]
        assert rows["colab"]["experts_on_device"] == plan["experts_on_device"] == rows["colab_no_prefetch"][
            "experts_on_device"]
        assert rows["colab_no_prefetch"]["decode_counters"]["prefetches"] == 0
        assert rows["full_swap"]["bytes_to_host_per_token"] > 0
        assert (plan["device_total"] <= plan["device_budget"]) and plan["fits"]
        assert q["host_peak_rss_bytes"] > 0
    assert res["routing"]["source"] == "mixtral-table5"


def test_cpu_run_reports(cpu_run):
    _, root, res = cpu_run
    docs = root / "docs"
    assert json.loads((docs / "benchmarks.json").read_text())["name"] == res["name"]
    md = (docs / "benchmarks.md").read_text()
    for text in ("Naive offloading (accelerate)", "paper 2-bit T4", "2.092", "T4 estimate", "mixtral-table5"):
        assert text in md
    svg = ET.parse(docs / "figures" / "benchmarks.svg").getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter("{http://www.w3.org/2000/svg}rect"))) >= 8


def test_a_failing_row_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    import moe_colab.bench.naive as bn

    def broken(*a, **k):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(bn, "build_naive", broken)
    rc = bench.main(TINY + ["--quant", "paper-2bit", "--rows", "full,naive", "--out", str(tmp_path / "d"),
                            "--results-dir", str(tmp_path / "b"), "--name", "f"])
    assert rc == 1
    res = json.loads((tmp_path / "b" / "bench_f.json").read_text())
    rows = res["quants"]["paper-2bit"]["rows"]
    assert "injected failure" in rows["naive"]["error"]
    assert rows["full"]["decode_tokens_per_s"] > 0
    assert "failed" in (tmp_path / "d" / "benchmarks.md").read_text()


@pytest.mark.parametrize("argv", [["--quant", "paper-5bit"], ["--rows", "full,fast"], ["--prompts", "0"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + argv)
    assert e.value.code == 2


def test_bad_routing_is_an_error(tmp_path, capsys):
    rc = bench.main(TINY + ["--routing", "synthetic:1.5", "--out", str(tmp_path), "--results-dir", str(tmp_path)])
    assert rc == 2 and "outside [0, 1]" in capsys.readouterr().err


# -- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.2, 0.464, 0.7, 1.0])
def test_synthetic_overlap_reaches_its_target(target):
    e = synthetic_experts([target] * 3, 4000, 8, 2, seed=1)
    assert e.shape == (3, 4000, 2)
    assert ((e >= 0) & (e < 8)).all() and (e[..., 0] != e[..., 1]).all()
    ov = consecutive_overlap(e)
    assert torch.allclose(ov, torch.full((3,), target), atol=0.03), ov


def test_table5_preset_follows_mixtral():
    overlaps = [table5_overlap(l, 32) for l in range(32)]
    assert max(overlaps) == overlaps[15] and overlaps[0] < overlaps[31] < overlaps[15]
    assert all(o > chance_overlap(8, 2) for o in overlaps)
    r = make_routing("mixtral-table5", num_layers=32, num_experts=8, top_k=2, tokens=3000, recall=0.8,
                     count=2, device="cpu")
    measured = consecutive_overlap(r.experts)
    assert (measured - torch.tensor(overlaps)).abs().max() < 0.04


@pytest.mark.parametrize("recall", [0.0, 0.5, 1.0])
def test_replayed_guesses_have_the_chosen_recall(recall):
    e = synthetic_experts([0.5] * 4, 1500, 8, 2, seed=2)
    r = ReplayRouting(e, 8, recall=recall, count=2, seed=3)
    assert abs(r.summary(prefix=0)["guess_recall_measured"] - recall) < 0.04
    assert ((r.guesses[1:] >= 0) & (r.guesses[1:] < 8)).all()
    assert (r.guesses[1:, :, 0] != r.guesses[1:, :, 1]).all()


def test_replay_walks_the_trace_and_guesses_the_next_layer():
    e = synthetic_experts([0.5] * 3, 10, 8, 2, seed=4)
    r = ReplayRouting(e, 8, recall=1.0, count=2)
    x = torch.zeros(4, 16)
    w, i = r.route(0, None, x)                                  # prompt of 4 tokens
    assert torch.equal(i, e[0, :4]) and w.shape == (4, 2)
    assert set(r.guess(1).tolist()) <= set(e[1, :4].reshape(-1).tolist())
    _, i = r.route(0, None, x[:1])                              # then one decoded token
    assert torch.equal(i, e[0, 4:5])
    assert set(r.guess(1).tolist()) == set(e[1, 4].tolist())
    with pytest.raises(RuntimeError, match="trace has 10 tokens"):
        r.route(0, None, torch.zeros(6, 16))
    r.reset()
    assert torch.equal(r.route(0, None, x[:1])[1], e[0, :1])


def test_trace_file_routing_tiles_layers(tmp_path):
    from moe_colab.analysis.routing import RoutingTrace
    e = synthetic_experts([0.6, 0.3], 50, 8, 2, seed=5)
    RoutingTrace(e, num_experts=8).save(tmp_path / "t.safetensors")
    r = make_routing(f"trace:{tmp_path / 't.safetensors'}", num_layers=5, num_experts=8, top_k=2, tokens=40,
                     recall=0.8, count=2, device="cpu")
    assert torch.equal(r.experts[4], e[0, :40]) and torch.equal(r.experts[3], e[1, :40])
    with pytest.raises(ValueError, match="needs 60"):
        make_routing(f"trace:{tmp_path / 't.safetensors'}", num_layers=5, num_experts=8, top_k=2, tokens=60,
                     recall=0.8, count=2, device="cpu")


# -- synthetic weights --------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,scale_group", [(2, 16, 128), (3, 64, 128), (4, 64, 256)])
def test_synthetic_weights_have_a_sane_scale(bits, group, scale_group):
    out, inn = 256, 512
    mat = {n: torch.empty(s, dtype=d) for n, (s, d) in tensor_shapes(bits, (out, inn), group, scale_group).items()}
    fill_quant_(mat, bits, inn, generator(0, "w", "cpu"))
    W = dequantize(mat, bits, group, scale_group, (out, inn), torch.float32)
    assert torch.isfinite(W).all()
    std = W.std().item() * inn ** 0.5                     # target: std 1/sqrt(in)
    assert 0.8 < std < 1.25, std
    assert abs(W.mean().item()) < 0.1 / inn ** 0.5


def test_offloaded_model_matches_naive_model_logits():
    """Two assemblies of the same synthetic bytes (engine cache vs accelerate on disk) agree."""
    from moe_colab.bench.naive import build_naive

    cfg, q = bench_config("tiny", layers=3), resolve_quant("paper-2bit")
    store = make_store(cfg, q, "cpu", torch.float32, seed=7)
    ids = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = build_offloaded(cfg, q, store, OffloadOptions(experts_on_device=2, prefetch=1), device="cpu",
                                dtype=torch.float32, seed=7)
        a = model(ids).logits
        with tempfile.TemporaryDirectory() as d:
            naive, info = build_naive(cfg, q, store, device="cpu", dtype=torch.float32, seed=7,
                                      max_device_bytes=None, offload_dir=d)
            b = naive(ids).logits
    assert info["offloaded_modules"]
    assert torch.isfinite(a).all() and a.std() > 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_store_is_filled_in_the_quantized_layout():
    cfg, q = bench_config("tiny"), resolve_quant("paper-3bit")
    store = make_store(cfg, q, "cpu", torch.float32, seed=1)
    assert not store.missing()
    v = store.views(1, 5)
    assert set(v) == {s.name for s in store.format.layout.specs}
    assert (v["w2.s_q"] >= 40).all() and (v["w2.s_q"] <= 60).all()
    other = make_store(cfg, q, "cpu", torch.float32, seed=1)
    assert torch.equal(store.buffers[1], other.buffers[1])            # seeded: reproducible
    assert not torch.equal(store.buffers[0][0], store.buffers[0][1])  # experts differ


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_small_scale(tmp_path):
    rc = bench.main(["--scale", "small", "--quick", "--quant", "paper-2bit", "--profile", "--naive-device-gib", "0.15",
                     "--out", str(tmp_path / "d"),
                     "--results-dir", str(tmp_path / "b"), "--name", "g"])
    res = json.loads((tmp_path / "b" / "bench_g.json").read_text())
    rows = res["quants"]["paper-2bit"]["rows"]
    assert rc == 0, {k: v.get("error") for k, v in rows.items()}
    assert rows["naive"]["offload_tier"] == "cpu"
    assert rows["no_cache"]["bytes_per_token"] > rows["full"]["bytes_per_token"] * 0.9


def test_swap_row_on_cpu(tmp_path):
    """The engine's swap mode: fewer host rows, copies both ways, the same tokens as full."""
    rc = bench.main(TINY + ["--quant", "paper-2bit", "--rows", "full,full_swap", "--out", str(tmp_path / "d"),
                            "--results-dir", str(tmp_path / "b"), "--name", "s"])
    assert rc == 0
    q = json.loads((tmp_path / "b" / "bench_s.json").read_text())["quants"]["paper-2bit"]
    sw, cfg = q["rows"]["full_swap"], bench_config("tiny")
    E, k = cfg.num_local_experts, 4
    assert sw["host_expert_bytes"] == cfg.num_hidden_layers * (E - k + 1) * q["expert_bytes"]
    assert sw["same_tokens_as_full"] == 1.0
    assert sw["bytes_to_host_per_token"] > 0
    assert sw["bytes_per_token"] == pytest.approx(
        (sw["decode_counters"]["bytes_to_device"] + sw["decode_counters"]["bytes_to_host"]) / sw["decoded_tokens"])
    assert "swap mode" in (tmp_path / "d" / "benchmarks.md").read_text()


def test_replay_reset_repeats_prompt_chunk_guesses():
    """Every row replays the same routing: after reset() a prompt chunk gets the same guesses."""
    from moe_colab.bench.replay import make_routing
    r = make_routing("synthetic:0.6", num_layers=3, num_experts=8, top_k=2, tokens=40, recall=0.5,
                     count=2, device="cpu")
    x = torch.zeros(16, 4)

    def once():
        r.reset()
        for layer in range(3):
            r.route(layer, None, x)
        return [r.guess(layer).tolist() for layer in (1, 2)]
    assert once() == once()
