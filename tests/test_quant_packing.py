"""The low-bit format's reference implementation: packing, meta-quantization, dequantization."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_colab.quant import packing
from moe_colab.quant.packing import (dequantize, dequantize_codes, meta_dequantize, meta_quantize,
                                     pack_codes, quant_linear_torch, tensor_shapes, unpack_codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), out=st.integers(1, 9), in8=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, out, in8, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randint(0, 1 << bits, (out, 8 * in8), generator=g, dtype=torch.uint8)
    codes = pack_codes(Q, bits)
    assert set(codes) == set(packing.CODE_NAMES[bits])
    assert sum(c.numel() for c in codes.values()) * 8 == bits * Q.numel()   # exactly `bits` per weight
    assert torch.equal(unpack_codes(codes, bits, Q.shape[1]), Q)


def test_planar_layout_matches_the_contract():
    # Q[o, j + s*in/planes] lands in bits s*width of byte j, as notes/quant_format.md says.
    Q = torch.arange(16, dtype=torch.uint8).view(1, 16)
    assert pack_codes(Q, 4)["q4"].tolist() == [[i | ((i + 8) << 4) for i in range(8)]]
    Q2 = Q % 4
    want = [sum(int(Q2[0, j + s * 4]) << (2 * s) for s in range(4)) for j in range(4)]
    assert pack_codes(Q2, 2)["q2"].tolist() == [want]
    Q3 = (Q * 3) % 8
    c = pack_codes(Q3, 3)
    assert c["q2"].tolist() == [[sum(int(Q3[0, j + s * 4] & 3) << (2 * s) for s in range(4)) for j in range(4)]]
    assert c["q1"].tolist() == [[sum(((int(Q3[0, j + s * 2]) >> 2) & 1) << s for s in range(8)) for j in range(2)]]


def _bound_holds(v, scale_group):
    q, s, z = meta_quantize(v, scale_group)
    n = v.numel()
    assert q.dtype == torch.uint8 and q.shape == (n,)
    assert s.dtype == z.dtype == torch.float16 and s.shape == z.shape == (-(-n // scale_group),)
    v_hat = meta_dequantize(q, s, z, scale_group, n)
    flat = v.reshape(-1).double()
    m = torch.arange(n) // scale_group
    err = (flat - v_hat.double()).abs()
    # within half a step (plus fp32 arithmetic), and the step is the min-max step up to fp16
    # rounding unless the zero-point had to be kept within fp16's exact range
    assert (err <= s.double()[m] / 2 * (1 + 1e-6) + flat.abs() * 2e-7).all(), err.max()
    pad = torch.cat([flat, flat[-1:].expand(len(s) * scale_group - n)]).view(len(s), scale_group)
    lo, hi = pad.amin(1), pad.amax(1)
    ideal = torch.maximum((hi - lo) / 255, lo.abs() / 2000).clamp_min(2.0 ** -24)
    assert (s.double() >= ideal).all()
    assert (s.double() <= ideal * (1 + 2 ** -10) + 2.0 ** -24).all()
    return err, s


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), scale_group=st.sampled_from([1, 7, 128, 256]), seed=st.integers(0, 2**31),
       center=st.floats(-4, 4), spread=st.floats(1e-4, 10))
def test_meta_quantization_error_is_bounded(n, scale_group, seed, center, spread):
    g = torch.Generator().manual_seed(seed)
    _bound_holds(center + spread * torch.randn(n, generator=g), scale_group)


def test_meta_quantization_of_realistic_scales_is_within_half_a_min_max_step():
    # hqq scales of 2-bit weights: positive, spread over a factor of a few inside a meta-group
    g = torch.Generator().manual_seed(0)
    S = (0.004 + 0.02 * torch.rand(64, 32, generator=g))
    err, s = _bound_holds(S, 128)
    groups = S.reshape(-1, 128)
    rng = (groups.amax(1) - groups.amin(1)).double()
    assert (err.view(-1, 128).amax(1) <= rng / 255 / 2 * (1 + 2 ** -9)).all()


def test_meta_quantization_edge_cases():
    for v in (torch.zeros(10), torch.full((300,), 1.0), torch.tensor([-3.0, 5.0]), torch.tensor([7.25])):
        _bound_holds(v, 128)
    with pytest.raises(ValueError, match="inf or nan"):
        meta_quantize(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="scale_group"):
        meta_quantize(torch.ones(4), 0)


def _random_mat(bits, out, inn, group_size, scale_group, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randint(0, 1 << bits, (out, inn), generator=g, dtype=torch.uint8)
    S = 0.01 + 0.01 * torch.rand(out * inn // group_size, generator=g)
    Z = (1 << bits) / 2 + torch.randn(out * inn // group_size, generator=g)
    mat = pack_codes(Q, bits)
    for name, v in (("s", S), ("z", Z)):
        mat[f"{name}_q"], mat[f"{name}_scale"], mat[f"{name}_zero"] = meta_quantize(v, scale_group)
    return Q, S, Z, mat


@pytest.mark.parametrize("bits,group_size,scale_group", [(4, 64, 256), (3, 64, 128), (2, 16, 128), (2, 8, 3)])
def test_dequantize_and_reference_linear(bits, group_size, scale_group):
    out, inn = 24, 128
    Q, S, Z, mat = _random_mat(bits, out, inn, group_size, scale_group)
    spec = tensor_shapes(bits, (out, inn), group_size, scale_group)
    assert {k: (tuple(v.shape), v.dtype) for k, v in mat.items()} == spec
    n = out * inn // group_size
    S_hat = meta_dequantize(mat["s_q"], mat["s_scale"], mat["s_zero"], scale_group, n)
    Z_hat = meta_dequantize(mat["z_q"], mat["z_scale"], mat["z_zero"], scale_group, n)
    W = dequantize(mat, bits, group_size, scale_group, (out, inn), torch.float32)
    # element by element from the formula W[o, i] = (Q[o, i] - Z[o, i//g]) * S[o, i//g]
    o, i = torch.meshgrid(torch.arange(out), torch.arange(inn), indexing="ij")
    k = o * (inn // group_size) + i // group_size
    assert torch.allclose(W, (Q.float() - Z_hat[k]) * S_hat[k], rtol=0, atol=1e-7)
    # and close to the unquantized scales/zeros (the meta-quantization error only)
    assert torch.allclose(W, dequantize_codes(Q, S, Z, group_size, (out, inn)), atol=2e-3)
    x = torch.randn(5, inn)
    assert torch.allclose(quant_linear_torch(x, mat, bits, group_size, scale_group, (out, inn)), x @ W.T, atol=1e-5)
    W16 = dequantize(mat, bits, group_size, scale_group, (out, inn), torch.float16)
    assert W16.dtype == torch.float16 and torch.equal(W16, W.half())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_codes(torch.full((2, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        tensor_shapes(4, (4, 64), 48, 256)
