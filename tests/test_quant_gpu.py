"""The quantization core on CUDA: hqq's optimizer on the GPU, quantize() there, and a
Mixtral-sized matrix (time printed). Skipped without CUDA."""
import time

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.matrix import hqq_quantize, quantize_matrix
from moe_colab.quant.packing import dequantize, dequantize_codes, pack_codes, quant_linear_torch, unpack_codes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 64), (2, 16)])
def test_hqq_on_cuda_equals_hqq_dequantize(bits, group_size):
    from hqq.core.quantize import Quantizer
    W = 0.02 * torch.randn(256, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(bits))
    W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=group_size, axis=1, device="cuda",
                                   round_zero=bits == 4)
    want = Quantizer.dequantize(W_q, meta).float().cpu()          # hqq computes this in fp16 on CUDA
    Q, S, Z = hqq_quantize(W, bits, group_size, "cuda")
    got = dequantize_codes(unpack_codes(pack_codes(Q, bits), bits, 512), S, Z, group_size, (256, 512))
    torch.testing.assert_close(got, want, atol=2e-3 * float(W.abs().max()), rtol=2e-3)


def test_quantize_on_cuda_loads_and_runs(tmp_path):
    from moe_colab.quant.experts import model_from_quantized_dir
    ck = write_checkpoint(tmp_path / "ck", layers=2, experts=3, hidden=64, intermediate=128, seed=2)
    on_gpu = moe_colab.quantize(ck, tmp_path / "g", "paper-2bit", progress=False, device="cuda")
    on_cpu = moe_colab.quantize(ck, tmp_path / "c", "paper-2bit", progress=False, device="cpu")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        a = model_from_quantized_dir(on_gpu, dtype=torch.float16, device="cuda")(ids.cuda()).logits.float().cpu()
        b = model_from_quantized_dir(on_cpu)(ids).logits
    # hqq's optimizer runs in fp16 on CUDA, fp32 on CPU: close, not identical
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.slow
def test_mixtral_sized_expert_matrix():
    W = 0.02 * torch.randn(14336, 4096, device="cuda", dtype=torch.float16)
    for bits, g, sg in [(4, 64, 256), (3, 64, 128), (2, 16, 128)]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        mat = quantize_matrix(W, bits, g, sg)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        mat = {k: v.cuda() for k, v in mat.items()}
        rel = ((dequantize(mat, bits, g, sg, tuple(W.shape), torch.float32) - W.float()).norm() / W.float().norm()).item()
        x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
        y = quant_linear_torch(x, mat, bits, g, sg, tuple(W.shape))
        nbytes = sum(v.numel() * v.element_size() for v in mat.values())
        print(f"{bits}-bit: {dt:.2f} s per 14336x4096 matrix (x768 experts = {768 * dt / 60:.1f} min), "
              f"{8 * nbytes / W.numel():.3f} bits/weight, rel. error {rel:.4f}")
        assert y.shape == (4, 14336) and torch.isfinite(y).all()
        assert rel < {4: 0.12, 3: 0.25, 2: 0.4}[bits]
