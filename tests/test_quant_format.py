"""QuantizedExpertFormat (one buffer per expert), QuantLinear and quantize_trunk_."""
import pytest
import torch
import torch.nn.functional as F

from moe_colab.config import mixtral_config
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.format import QuantizedExpertFormat, QuantLinear, expert_format, quantize_trunk_
from moe_colab.quant.matrix import quantize_matrix
from moe_colab.quant.packing import dequantize
from moe_colab.engine.storage import DenseExpertFormat, ExpertStore

H, I = 64, 128


@pytest.mark.parametrize("e", [4, 3, 2])
def test_expert_in_one_buffer_through_the_store(e):
    qcfg = QuantConfig(16, e)
    fmt = QuantizedExpertFormat(H, I, qcfg, torch.float32)
    names = {s.name for s in fmt.layout.specs}
    assert all(n.split(".")[0] in ("w1", "w2", "w3") for n in names)
    assert {n.split(".", 1)[1] for n in names} >= {"s_q", "s_scale", "s_zero", "z_q", "z_scale", "z_zero"}
    store = ExpertStore(num_layers=1, num_experts=2, fmt=fmt, pin=False)
    g = torch.Generator().manual_seed(e)
    W = {(x, n): 0.05 * torch.randn(*(fmt.shapes[n]), generator=g) for x in range(2) for n in ("w1", "w2", "w3")}
    for (x, n), w in W.items():
        store.write(0, x, n, w)
    assert store.missing() == []
    _, group_size, scale_group = qcfg.matrix("expert")
    x_in = torch.randn(5, H, generator=g)
    for x in range(2):
        views = store.views(0, x)
        # every matrix in the buffer is exactly hqq + meta-quantization of the original
        for n in ("w1", "w2", "w3"):
            want = quantize_matrix(W[(x, n)], e, group_size, scale_group, "cpu")
            for t, v in want.items():
                assert torch.equal(views[f"{n}.{t}"], v), (n, t)
        D = {n: dequantize(fmt.matrices(views)[n], e, group_size, scale_group, fmt.shapes[n], torch.float32)
             for n in ("w1", "w2", "w3")}
        ref = F.linear(F.silu(F.linear(x_in, D["w1"])) * F.linear(x_in, D["w3"]), D["w2"])
        torch.testing.assert_close(fmt.forward(views, x_in), ref, atol=1e-5, rtol=1e-5)
        # and it approximates the 16-bit expert
        dense = F.linear(F.silu(F.linear(x_in, W[(x, "w1")])) * F.linear(x_in, W[(x, "w3")]), W[(x, "w2")])
        rel = (fmt.forward(views, x_in) - dense).norm() / dense.norm()
        assert rel < {4: 0.2, 3: 0.4, 2: 0.8}[e]
    # a copy of the buffer is a copy of the expert (one host-to-device copy moves everything)
    clone = store.buffer(0, 1).clone()
    torch.testing.assert_close(fmt.forward(fmt.layout.views(clone), x_in), fmt.forward(store.views(0, 1), x_in))


def test_quantized_expert_is_smaller_and_errors_are_named():
    fmt = QuantizedExpertFormat(H, I, QuantConfig(16, 2), torch.float16)
    dense = DenseExpertFormat(H, I, torch.float16)
    assert fmt.layout.nbytes < dense.layout.nbytes / 4
    views = fmt.layout.views(torch.zeros(fmt.layout.nbytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expert weight w2 has shape \(128, 64\), expected \(64, 128\)"):
        fmt.write(views, "w2", torch.randn(I, H))
    with pytest.raises(KeyError, match="unknown expert matrix 'w4'"):
        fmt.write(views, "w4", torch.randn(I, H))
    with pytest.raises(ValueError, match="expert_bits=16"):
        QuantizedExpertFormat(H, I, QuantConfig(4, 16))
    cfg = mixtral_config("debug")
    assert isinstance(expert_format(cfg, None), DenseExpertFormat)
    assert isinstance(expert_format(cfg, QuantConfig(4, 16)), DenseExpertFormat)
    assert isinstance(expert_format(cfg, QuantConfig(16, 3)), QuantizedExpertFormat)


@pytest.mark.parametrize("bits,group_size,scale_group", [(4, 64, 256), (3, 64, 128), (2, 16, 128)])
def test_quant_linear_matches_its_dequantized_weight(bits, group_size, scale_group):
    torch.manual_seed(bits)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = QuantLinear.from_linear(lin, bits, group_size, scale_group, "cpu")
    W = dequantize(q.matrix(), bits, group_size, scale_group, (48, 128), torch.float32)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(q(x), F.linear(x, W, lin.bias), atol=1e-5, rtol=1e-5)
    assert q(x).shape == (2, 3, 48)
    # its buffers are the state dict a quantized directory stores
    assert set(q.state_dict()) == set(quantize_matrix(lin.weight, bits, group_size, scale_group, "cpu")) | {"bias"}


def test_quantize_trunk_replaces_attention_projections_only():
    from transformers import MixtralForCausalLM
    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config("debug")).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    embed = model.model.embed_tokens.weight.clone()
    assert quantize_trunk_(model, None) is model
    quantize_trunk_(model, QuantConfig(4, 16), device="cpu")
    for layer in model.model.layers:
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, p), QuantLinear)
        assert isinstance(layer.mlp.gate.weight, torch.nn.Parameter)      # routers stay 16-bit
    assert torch.equal(model.model.embed_tokens.weight, embed)
    with torch.no_grad():
        after = model(ids).logits
    assert 0 < (after - before).abs().max() < 0.5 * before.abs().max()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_trunk_(model, QuantConfig(4, 16))


def test_expert_format_forgets_dropped_slots():
    """The format keeps per-slot state (checked matrices, CUDA graphs) only while the slot lives:
    a dropped cache must not keep its slot memory alive through the format."""
    import gc
    import weakref

    from moe_colab.quant.config import QuantConfig
    from moe_colab.quant.format import QuantizedExpertFormat

    fmt = QuantizedExpertFormat(256, 512, QuantConfig(4, 2), torch.float32)
    buf = torch.zeros(fmt.layout.nbytes, dtype=torch.uint8)
    views = fmt.layout.views(buf)
    x = torch.randn(1, 256)
    first = fmt.forward(views, x)
    assert torch.equal(fmt.forward(views, x), first)          # the second call uses the kept state
    state = weakref.ref(views.cached[1])                      # one state kept, for this slot
    assert state() is not None
    del views, buf
    gc.collect()
    assert state() is None
    plain = dict(fmt.layout.views(torch.zeros(fmt.layout.nbytes, dtype=torch.uint8)))
    assert torch.equal(fmt.forward(plain, x), first)          # a plain dict works too, without state
    assert not hasattr(plain, "cached")


def test_cuda_graphs_switch():
    """moe_colab.engine.graphs is reachable from the package, off unless asked for (per model, in
    its ModelCompute), and never captures anything for CPU tensors even when on (the CPU path
    stays eager)."""
    import moe_colab
    from moe_colab.engine.compute import ModelCompute
    from moe_colab.engine.graphs import OneTokenGraphs

    assert moe_colab.engine.graphs.OneTokenGraphs is OneTokenGraphs
    assert OneTokenGraphs().compute.cuda_graphs is False
    g = OneTokenGraphs(ModelCompute(cuda_graphs=True))
    x = torch.randn(1, 8)
    for _ in range(3):
        assert torch.equal(g.run("k", lambda t: t * 2, x), x * 2)
    assert not g.graphs and not g.seen
