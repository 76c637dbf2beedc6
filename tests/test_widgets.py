"""Widgets: the figures show what the trace holds, the cache events are the simulator's, and the
explorer's readout follows its sliders. Live rendering in a browser is tests/test_browser.py."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from moe_colab.notebook import widgets as W
from moe_colab.analysis.routing import RoutingTrace, record_routing
from moe_colab.analysis.simulate import simulate_cache, simulate_prefetch


def random_trace(layers=3, tokens=25, experts=6, top_k=2, seed=0, locality=0.5):
    """Random routing with some reuse: each token keeps its predecessor's experts with prob. locality."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(layers, tokens, top_k, dtype=torch.long)
    for l in range(layers):
        prev = torch.randperm(experts, generator=g)[:top_k]
        for t in range(tokens):
            if torch.rand((), generator=g) > locality:
                prev = torch.randperm(experts, generator=g)[:top_k]
            rows[l, t] = prev
    weights = torch.rand(layers, tokens, top_k, generator=g).softmax(-1)
    return RoutingTrace(rows, weights, num_experts=experts, tokens=[f"tok{i}<" for i in range(tokens)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("policy", W.POLICIES)
def test_events_agree_with_simulate_cache(policy, seed):
    trace = random_trace(seed=seed, top_k=1 + seed % 3)
    for k in range(1, trace.num_experts + 1):
        ev = W.cache_events(trace, k, policy)
        ref = simulate_cache(trace, k, policy)
        assert ev.hits.sum(axis=(1, 2)).tolist() == ref["per_layer"]["hits"], (policy, k)
        assert ev.hit_ratio == pytest.approx(ref["hit_ratio"])
        assert (ev.hit_counts == ev.hits.sum(-1)).all()


def test_events_mark_first_uses_as_misses_and_repeats_as_hits_in_a_full_cache():
    trace = random_trace(seed=3)
    ev = W.cache_events(trace, trace.num_experts, "lru")     # nothing is ever evicted
    seen = [set() for _ in range(trace.num_layers)]
    for l in range(trace.num_layers):
        for t in range(trace.num_tokens):
            for r, e in enumerate(trace.experts[l, t].tolist()):
                assert ev.hits[l, t, r] == (e in seen[l]), (l, t, e)
            seen[l].update(trace.experts[l, t].tolist())


def test_prefetch_events_agree_with_simulate_prefetch():
    trace = random_trace(seed=4, tokens=20)
    guesses = torch.roll(trace.experts, 1, dims=1)          # "the previous token's experts"
    for k, p in [(2, 1), (3, 2), (6, 2)]:
        ev = W.cache_events(trace, k, "lru", p, guesses)
        ref = simulate_prefetch(trace, guesses, k, p)
        assert ev.hit_counts.sum(axis=1).tolist() == ref["per_layer"]["hits"]
        assert ev.hit_ratio == pytest.approx(ref["hit_ratio"])


def test_perfect_guesses_hit_everything_after_layer_zero():
    trace = random_trace(seed=5)
    guesses = trace.experts.clone()
    guesses[0] = -1                                          # nothing guesses layer 0
    ev = W.cache_events(trace, 2, "lru", 2, guesses)
    assert ev.hits[1:].all() and not ev.hits[0, 0].any()
    with pytest.raises(ValueError, match="needs guesses"):
        W.cache_events(trace, 2, "lru", 2, None)


def test_routing_figure_shows_every_rank_and_hover_has_all_experts():
    trace = random_trace(seed=6, top_k=3)
    K = trace.top_k
    fig = W.routing_figure(trace)
    hm = fig.data[0]
    z = np.asarray(hm.z)
    for l in range(trace.num_layers):          # one row per rank: every chosen expert is drawn
        for r in range(K):
            assert np.array_equal(z[l * K + r], trace.experts[l, :, r].numpy())
    # Plotly reads tick labels as HTML ("<s>", a BOS token, would strike through): escaped.
    assert list(fig.layout.xaxis.ticktext) == [f"tok{i}&lt;" for i in range(trace.num_tokens)]
    assert fig.layout.width is None                         # fits the page: nothing clipped
    l, t = 2, 7
    token, choice, rank = hm.customdata[l * K + 1][t]
    assert token == "tok7&lt;" and rank == "2nd"            # escaped for plotly's hover HTML
    for e, w in zip(trace.experts[l, t].tolist(), trace.weights[l, t].tolist()):
        assert f"e{e} {w:.2f}" in choice
    # One flat colour band per expert id, from the colour-blind-safe palette.
    assert len({c for _, c in hm.colorscale}) == trace.num_experts
    assert {c for _, c in hm.colorscale} <= set(W.S.OKABE_ITO)


def test_cache_figure_counts_misses():
    trace = random_trace(seed=7)
    ev = W.cache_events(trace, 2, "fifo")
    fig = W.cache_figure(trace, ev)
    assert np.array_equal(np.asarray(fig.data[0].z), trace.top_k - ev.hits.sum(-1))
    assert f"{ev.hit_ratio:.2f}" in fig.layout.title.text
    assert "MISS" in fig.data[0].customdata[0][0][1]        # token 0 always misses


def test_explorer_readout_follows_sliders():
    trace = random_trace(seed=8, tokens=30)
    guesses = torch.roll(trace.experts, 1, dims=1)
    x = W.cache_explorer(trace, cache_size=4, guesses=guesses, interactive=True)
    assert isinstance(x, W.CacheExplorer)

    def shown():
        return float(x.readout.value.split("hit ratio: ")[1][:4])

    assert shown() == pytest.approx(simulate_cache(trace, 4, "lru")["hit_ratio"], abs=0.005)
    z_before = np.asarray(x.shown.figure.data[0].z).copy()
    x.cache_size.value = 1
    assert shown() == pytest.approx(simulate_cache(trace, 1, "lru")["hit_ratio"], abs=0.005)
    assert not np.array_equal(np.asarray(x.shown.figure.data[0].z), z_before)
    x.policy.value = "belady"
    assert shown() == pytest.approx(simulate_cache(trace, 1, "belady")["hit_ratio"], abs=0.005)
    x.cache_size.value = 3
    x.prefetch.value = 2
    assert x.policy.disabled
    assert shown() == pytest.approx(simulate_prefetch(trace, guesses, 3, 2)["hit_ratio"], abs=0.005)
    classes = {c for w in (x.cache_size, x.prefetch, x.policy, x.readout) for c in w._dom_classes}
    assert classes == {"moe-cache-size", "moe-prefetch", "moe-policy", "moe-hit-ratio"}
    assert "moe-cache-explorer" in x.box._dom_classes
    assert x.cache_size.description == "cache size" and x.prefetch.description == "prefetch"


def test_explorer_without_guesses_disables_prefetch():
    x = W.cache_explorer(random_trace(seed=9), interactive=True)
    assert x.prefetch.disabled and x.prefetch.value == 0
    with pytest.raises(ValueError, match="policy"):
        W.cache_explorer(random_trace(seed=9), policy="random", interactive=True)


def test_static_fallback_outside_a_kernel(monkeypatch):
    trace = random_trace(seed=10)
    # pytest is plain Python, not a Jupyter kernel: figures, not widgets.
    assert isinstance(W.routing_heatmap(trace), W.Shown)
    assert isinstance(W.cache_timeline(trace, 2), W.Shown)
    shown = W.cache_explorer(trace, cache_size=3)
    # without a kernel the explorer is the figure it would first show (not a second copy of the
    # hit-ratio chart a notebook already shows)
    assert isinstance(shown, W.Shown) and shown.figure.layout.title.text == W.cache_events(trace, 3).title()
    table = W.hit_ratio_figure(trace)
    belady, lru = table.data[3].y[trace.top_k - 1:], table.data[0].y[trace.top_k - 1:]
    assert all(b >= l - 1e-9 for b, l in zip(belady, lru))  # the offline optimum (k >= top_k)
    assert isinstance(W.cache_explorer(trace, interactive=True), W.LiveView)
    monkeypatch.setenv("MOE_COLAB_STATIC", "1")
    from moe_colab.notebook.runtime import widgets_available
    assert not widgets_available()


def test_shown_carries_plotly_json_and_a_static_picture_not_plotly_js(monkeypatch):
    import json
    import xml.etree.ElementTree as ET
    trace = random_trace(seed=12, tokens=80)
    bundle = W.routing_heatmap(trace)._repr_mimebundle_()
    assert set(bundle) == {"application/vnd.plotly.v1+json", "image/svg+xml", "text/plain"}
    size = len(json.dumps(bundle["application/vnd.plotly.v1+json"]))
    assert size < 500_000 and "Plotly.newPlot" not in json.dumps(bundle)      # data only, no plotly.js
    svg = ET.fromstring(bundle["image/svg+xml"])
    assert svg.get("width") == "100%" and svg.get("viewBox")                  # scales to the page
    drawn = {r.get("fill") for r in svg.iter("{http://www.w3.org/2000/svg}rect")}
    used = {W.PALETTE[e] for e in trace.experts.unique().tolist()}
    assert used <= drawn                                                      # every chosen expert drawn
    monkeypatch.setattr(W, "in_colab", lambda: True)
    html = W.routing_heatmap(trace)._repr_mimebundle_()["text/html"]
    assert "cdn.plot.ly" in html and len(html) < 1_000_000                   # Colab: plotly.js from its CDN


def test_live_view_updates_its_figure_in_place():
    trace = random_trace(seed=13)
    x = W.cache_explorer(trace, cache_size=2, interactive=True)
    (out,) = x.output.outputs
    assert set(out["data"]) == {"application/vnd.plotly.v1+json", "image/svg+xml", "text/plain"}
    x.cache_size.value = 4
    (out,) = x.output.outputs                                   # replaced, not appended
    assert "cache of 4" in out["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"]
    bundle = x.box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["image/svg+xml"] == x.shown.svg and "cache of 4" in x.shown.svg   # what a saved notebook shows


def test_show_draws_line_and_bar_charts():
    fig = go.Figure([go.Scatter(x=[1, 2, 3], y=[0.1, 0.5, 0.4], name="a"), go.Scatter(x=[1, 2, 3], y=[0.2, 0.3, 0.9], name="b")])
    fig.add_hline(y=0.25, annotation_text="chance")
    svg = W.show(fig).svg
    assert svg.count("<polyline") == 2 and "chance" in svg
    bars = W.show(go.Figure([go.Bar(x=["x", "y"], y=[1.0, 2.0], name="ours")])).svg
    assert bars.count("<rect") >= 3 and "ours" in bars
    assert W.show(go.Figure(go.Pie(values=[1, 2]))).svg is None              # not drawn: no fake picture


def test_text_table_marks_misses():
    trace = random_trace(seed=11, tokens=5)
    ev = W.cache_events(trace, trace.num_experts, "lru")
    table = W.text_table(trace, events=ev).splitlines()
    assert len(table) == 1 + 5
    assert table[1].count("*") == trace.num_layers            # the first token misses everywhere
    assert W.text_table(trace, max_tokens=2).endswith("3 more tokens")


def test_widgets_on_a_recorded_trace(small_checkpoint_with_tokenizer):
    from transformers import AutoTokenizer, MixtralForCausalLM
    path = small_checkpoint_with_tokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = MixtralForCausalLM.from_pretrained(path)
    ids = tok("for i in range(10):\n    print(i)", return_tensors="pt").input_ids
    trace = record_routing(model, ids, tokenizer=tok)
    fig = W.routing_figure(trace)
    assert len(fig.layout.xaxis.ticktext) == ids.shape[1]
    assert "print" in "".join(fig.layout.xaxis.ticktext)
    ev = W.cache_events(trace, 2, "lru")
    assert ev.hits.sum() == simulate_cache(trace, 2, "lru")["hits"]


@pytest.fixture(scope="module")
def small_checkpoint_with_tokenizer(tmp_path_factory):
    from conftest import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("wck"), layers=2, experts=4, top_k=2, vocab=320,
                            tokenizer=True)
