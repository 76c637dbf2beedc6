"""One matrix through hqq + meta-quantization: equal to hqq's own dequantization before the
meta step, and within the meta-quantization bound after it."""
import pytest
import torch

from moe_colab.quant.matrix import hqq_quantize, quantize_matrix
from moe_colab.quant.packing import (dequantize, dequantize_codes, meta_dequantize, pack_codes,
                                     unpack_codes)

SCHEMES = [(4, 64, 256), (3, 64, 128), (2, 16, 128), (2, 32, 7)]


@pytest.mark.parametrize("bits,group_size,scale_group", SCHEMES)
def test_before_meta_quantization_we_equal_hqq_dequantize(bits, group_size, scale_group):
    from hqq.core.quantize import Quantizer

    W = 0.02 * torch.randn(40, 128, generator=torch.Generator().manual_seed(bits))
    # hqq's own path: its packing (bitpack=True) and its dequantize
    W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=group_size, axis=1, device="cpu",
                                   round_zero=bits == 4)     # as hqq's BaseQuantizeConfig
    want = Quantizer.dequantize(W_q, meta).float()
    # ours: hqq's codes/scales/zeros through OUR planar packing and dequantization
    Q, S, Z = hqq_quantize(W, bits, group_size, "cpu")
    assert Q.dtype == torch.uint8 and int(Q.max()) < 1 << bits
    Q2 = unpack_codes(pack_codes(Q, bits), bits, W.shape[1])
    got = dequantize_codes(Q2, S, Z, group_size, tuple(W.shape))
    assert torch.equal(got, want)
    # and it is a real quantization of W (not a copy): error well above zero, below the range
    err = (got - W).abs()
    assert 0 < err.mean() < W.abs().max()


@pytest.mark.parametrize("bits,group_size,scale_group", SCHEMES)
def test_meta_quantized_matrix_error_is_bounded(bits, group_size, scale_group):
    W = 0.02 * torch.randn(40, 128, generator=torch.Generator().manual_seed(10 + bits))
    Q, S, Z = hqq_quantize(W, bits, group_size, "cpu")
    mat = quantize_matrix(W, bits, group_size, scale_group, "cpu")
    assert torch.equal(unpack_codes(mat, bits, 128), Q)            # codes are hqq's, untouched
    n = S.numel()
    m = torch.arange(n) // scale_group
    for v, prefix in ((S, "s"), (Z, "z")):
        v_hat = meta_dequantize(mat[f"{prefix}_q"], mat[f"{prefix}_scale"], mat[f"{prefix}_zero"], scale_group, n)
        step = mat[f"{prefix}_scale"].float()[m]
        assert ((v - v_hat).abs() <= step / 2 * (1 + 1e-5) + v.abs() * 1e-6).all()
        # the step is (about) the min-max step of each meta-group: range / 255
        pad = torch.cat([v, v[-1:].expand(-n % scale_group)]).view(-1, scale_group)
        rng = pad.amax(1) - pad.amin(1)
        ideal = torch.maximum(rng / 255, pad.amin(1).abs() / 2000)
        assert (mat[f"{prefix}_scale"].float() <= ideal * (1 + 2 ** -9) + 2 ** -24).all()
    # the whole matrix then differs from hqq's by at most |Q - Z| dS + S dZ per weight
    W_hqq = dequantize_codes(Q, S, Z, group_size, (40, 128))
    W_ours = dequantize(mat, bits, group_size, scale_group, (40, 128), torch.float32)
    dS = (mat["s_scale"].float()[m] / 2).repeat_interleave(group_size).view(40, 128)
    dZ = (mat["z_scale"].float()[m] / 2).repeat_interleave(group_size).view(40, 128)
    Zg, Sg = Z.repeat_interleave(group_size).view(40, 128), S.repeat_interleave(group_size).view(40, 128)
    bound = ((Q.float() - Zg).abs() + dZ) * dS + Sg * dZ
    assert ((W_ours - W_hqq).abs() <= bound * (1 + 1e-4) + 1e-7).all()


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="group size 48 does not divide the input dimension 128"):
        quantize_matrix(torch.randn(8, 128), 4, 48, 256, "cpu")
    with pytest.raises(ValueError, match="unsupported bit width 8"):
        quantize_matrix(torch.randn(8, 128), 8, 64, 256, "cpu")
    with pytest.raises(ValueError, match="2-D"):
        quantize_matrix(torch.randn(128), 4, 64, 256, "cpu")
