"""The per-model self-test of the fused kernels and the switch to the fast fallback
(moe_colab/engine/compute.py).

CPU: a ModelCompute accepts an injected fused-kernel function (it then runs on CPU tensors too),
so the mechanism is tested with kernels that are wrong in a known way: a wrong result in one
path, an exception, a failure after the self-test passed; one model falls back, another is not
touched; a loaded offloaded model shows it in offload_stats(). The oracle is the torch reference.
GPU (@pytest.mark.gpu): the real Triton kernels pass their self-test; the same kernels fed a wrong
argument (scales and zeros swapped) fail it, and that model, only that one, uses the fallback.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.engine.compute import ModelCompute, self_test_cases
from moe_colab.quant import kernels, packing
from test_kernels import SCHEMES, random_matrix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Kernel:
    """A fused-kernel stand-in: the torch reference, made wrong where ``wrong(x, split_k)`` says
    (scaled by 1.01) or raising ``raises``; counts its calls."""

    def __init__(self, wrong=lambda x, split_k: False, raises=None):
        self.wrong, self.raises, self.calls = wrong, raises, 0

    def __call__(self, x, mat, bits, g, sg, shape, *, split_k=None, trusted=False):
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        y = packing.quant_linear_torch(x.reshape(-1, x.shape[-1]), mat, bits, g, sg, shape)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y * 1.01 if self.wrong(x, split_k) else y


def _inputs(bits=2, shape=(64, 256), T=3):
    g, sg = SCHEMES[bits]
    return random_matrix(bits, shape, g, sg, seed=5), torch.randn(T, shape[1]), (bits, g, sg, shape)


def test_self_test_covers_every_path_mixtral_takes():
    """Each (path, one-token GEMV or not, split-K or not) that Mixtral's matrices take at T = 1..17
    on a T4 or an H200 is among the self-test's cases for that GPU."""
    def kind(T, cfg):
        return (cfg["path"], T == 1, cfg.get("split_k", 1) > 1) if cfg["path"] != "dequant" else ("dequant",)
    for cc, sms in [((7, 5), 40), ((9, 0), 132)]:
        for bits, (g, _) in SCHEMES.items():
            tested = {kind(c["T"], c["cfg"]) for c in self_test_cases(bits, g, torch.float16, cc, sms)}
            for shape in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]:
                for T in range(1, kernels.MAX_FUSED_T + 2):
                    cfg = kernels.launch_config(T, shape, bits, g, torch.float16, cc, sms)
                    assert kind(T, cfg) in tested, (cc, bits, shape, T, cfg, tested)
            assert (("dot", False, True) in tested) == (cc >= (8, 0) and bits == 2)


def test_a_wrong_kernel_falls_back_for_that_model_only():
    mat, x, (bits, g, sg, shape) = _inputs()
    good, bad = Kernel(), Kernel(wrong=lambda x, split_k: x.shape[0] == kernels.MAX_FUSED_T)
    a, b = ModelCompute(fused=good), ModelCompute(fused=bad)
    ref = packing.quant_linear_torch(x, mat, bits, g, sg, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the good kernel: no warning at all
        assert torch.equal(a.quant_linear(x, mat, bits, g, sg, shape), ref)
    with pytest.warns(UserWarning, match=r"self-test: 2-bit T=16 .*relative error .* bytes moved per weight"):
        yb = b.quant_linear(x, mat, bits, g, sg, shape)
    torch.testing.assert_close(yb, ref, rtol=1e-6, atol=1e-6)     # the fallback, not the wrong kernel
    calls = bad.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # warned once
        b.quant_linear(x, mat, bits, g, sg, shape)
    assert bad.calls == calls                           # never called again
    assert "T=16" in b.fallbacks["kernels"] and a.fallbacks == {}
    assert a.tested == {("cpu", torch.float32, bits, g, sg): "ok"}
    n = good.calls
    a.quant_linear(x, mat, bits, g, sg, shape)
    assert good.calls == n + 1                          # tested once per scheme: now one call each


def test_an_exception_in_the_self_test_falls_back_and_names_it():
    mat, x, (bits, g, sg, shape) = _inputs(3, (16, 512))
    c = ModelCompute(fused=Kernel(raises=RuntimeError("PTX JIT failed on sm_75")))
    with pytest.warns(UserWarning, match="PTX JIT failed on sm_75"):
        y = c.quant_linear(x, mat, bits, g, sg, shape)
    torch.testing.assert_close(y, packing.quant_linear_torch(x, mat, bits, g, sg, shape), rtol=1e-6, atol=1e-6)
    assert "RuntimeError: PTX JIT failed" in c.report()["kernels"]


def test_without_the_self_test_a_wrong_kernel_goes_unnoticed():
    """The control: the self-test is what catches a wrong split-K kernel."""
    mat, x, (bits, g, sg, shape) = _inputs(T=1)
    wrong = Kernel(wrong=lambda x, split_k: split_k is None)
    c = ModelCompute(fused=wrong, self_test=False)
    y = c.quant_linear(x, mat, bits, g, sg, shape)
    assert not torch.allclose(y, packing.quant_linear_torch(x, mat, bits, g, sg, shape)) and c.fallbacks == {}
    checked = ModelCompute(fused=Kernel(wrong=lambda x, split_k: split_k is None))
    with pytest.warns(UserWarning, match="T=1 fma split_k="):
        checked.quant_linear(x, mat, bits, g, sg, shape)


def test_forced_triton_refuses_to_fall_back():
    mat, x, (bits, g, sg, shape) = _inputs()
    c = ModelCompute("triton", fused=Kernel(wrong=lambda x, split_k: True))
    with pytest.raises(RuntimeError, match="self-test.*kernels='triton'"):
        c.quant_linear(x, mat, bits, g, sg, shape)


def test_a_failure_after_the_self_test_still_falls_back_once():
    mat, x, (bits, g, sg, shape) = _inputs()
    k = Kernel()
    c = ModelCompute(fused=k)
    c.quant_linear(x, mat, bits, g, sg, shape)
    k.raises = RuntimeError("out of registers at T=7")
    with pytest.warns(UserWarning, match="out of registers"):
        y = c.quant_linear(x, mat, bits, g, sg, shape)
    torch.testing.assert_close(y, packing.quant_linear_torch(x, mat, bits, g, sg, shape), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="features"):      # a bad input is an error, never a fallback
        c.quant_linear(torch.randn(1, 128), mat, bits, g, sg, shape)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("selftest")
    ck = write_checkpoint(root / "ck", layers=2, experts=4, hidden=64, intermediate=128, seed=3)
    return moe_colab.quantize(ck, root / "q", quant="paper-2bit", progress=False)


def test_a_loaded_model_shows_its_fallback_in_offload_stats(quantized):
    """Two offloaded models in one process: the one whose kernel fails its self-test reports it in
    offload_stats()["fallbacks"] and still generates the same tokens; the other reports nothing."""
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    models = [moe_colab.load_model(quantized, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=1,
                                   progress=False) for _ in range(2)]
    models[0].offload_compute.fused = Kernel()
    models[1].offload_compute.fused = Kernel(wrong=lambda x, split_k: x.shape[0] == 2)
    with pytest.warns(UserWarning, match="self-test"):
        out = [m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0) for m in models]
    assert torch.equal(out[0], out[1])
    assert "fallbacks" not in models[0].offload_stats()
    assert "T=2" in models[1].offload_stats()["fallbacks"]["kernels"]


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_real_kernels_pass_and_a_wrong_argument_fails(monkeypatch, dtype):
    bits, (g, sg) = 2, SCHEMES[2]
    shape = (256, 1024)
    mat = random_matrix(bits, shape, g, sg, device="cuda")
    x = torch.randn(3, shape[1], device="cuda", dtype=dtype)
    ref = packing.quant_linear_torch(x, mat, bits, g, sg, shape)
    healthy = ModelCompute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy.quant_linear(x, mat, bits, g, sg, shape)
    assert healthy.tested == {("cuda:0", dtype, bits, g, sg): "ok"} and healthy.fallbacks == {}
    # scales and zeros swapped in every launch: a kernel that runs but computes the wrong numbers
    real = kernels._meta_args
    monkeypatch.setattr(kernels, "_meta_args", lambda m: real(m)[3:] + real(m)[:3])
    broken = ModelCompute()
    with pytest.warns(UserWarning, match="self-test: 2-bit T=1 .*relative error"):
        y = broken.quant_linear(x, mat, bits, g, sg, shape)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    assert broken.fallback_impls == {"cuda:0": "cuda"}      # the NVRTC kernel passed its own check
    assert healthy.fallbacks == {} and "fallback_cuda" not in broken.fallbacks
