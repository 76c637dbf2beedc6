"""The paper authors' pre-quantized checkpoint (HQQ 0.1 tensors in their demo's layout): a tiny one
is written here the way hqq 0.1 and their HQQLinearTritonSavable write it, then read back,
dequantized, and converted into our format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint
from moe_colab.checkpoint import iter_tensors, shard_map
from moe_colab.convert.authors import (authors_source, authors_to_dense, convert_authors_checkpoint,
                                            dequantize_hqq01)
from test_hub import assert_same_quantization


# -- hqq 0.1.x, as its Quantizer.quantize (optimize=False, axis=0) and BitPack write codes ------------
def hqq01_quantize(W, nbits, group_size, channel_wise=True):
    W = W.float()
    shape = W.shape
    if group_size is not None and channel_wise:
        W = W.reshape(group_size, -1)                       # axis=0: a group is a column of this view
    if channel_wise:
        lo, hi = W.min(dim=0, keepdim=True)[0], W.max(dim=0, keepdim=True)[0]
    else:
        lo, hi = W.min(), W.max()
    max_v = 2**nbits - 1
    scale = (max_v / (hi - lo)).clamp(max=2e4)
    zero = -lo * scale
    Wq = torch.round(W * scale + zero).clamp(0, max_v)
    return pack01(Wq, nbits), {"scale": 1.0 / scale, "zero": zero, "shape": shape, "nbits": nbits}


def pack01(Wq, nbits):
    if nbits == 8:
        return Wq.to(torch.uint8)
    if nbits == 3:
        rows = -(-Wq.shape[0] // 10) * 10
        W = torch.zeros(rows, Wq.shape[1], dtype=torch.int32)
        W[:len(Wq)] = Wq.to(torch.int32)
        s = rows // 10
        out = torch.zeros(s, Wq.shape[1], dtype=torch.int32)
        for i in range(10):
            out |= W[i * s:(i + 1) * s] << (27 - 3 * i)
        return out
    W = Wq.to(torch.uint8)
    planes = 8 // nbits
    s = len(W) // planes
    out = torch.zeros(s, W.shape[1], dtype=torch.uint8)
    for i in range(planes):
        out |= W[i * s:(i + 1) * s] << (8 - nbits * (i + 1))
    return out


def unpack01(W_q, nbits):
    if nbits == 3:
        return torch.cat([(W_q >> (27 - 3 * i)) & 7 for i in range(10)]).to(torch.uint8)
    planes = 8 // nbits
    return torch.cat([(W_q >> (8 - nbits * (i + 1))) & ((1 << nbits) - 1) for i in range(planes)])


def hqq01_linear(W, nbits, group_size, scale_group, prefix):
    """HQQLinear.quantize (quant_scale, quant_zero) + the authors' repack + their state-dict names,
    meta tensors in fp16 as HQQLinear.cuda() leaves them."""
    out, inn = W.shape
    W_q, meta = hqq01_quantize(W, nbits, group_size)
    scale_q, meta_scale = hqq01_quantize(meta["scale"], 8, scale_group)
    zero_q, meta_zero = hqq01_quantize(meta["zero"], 8, None, channel_wise=False)
    codes = unpack01(W_q, nbits).reshape(-1)[:out * inn].reshape(out, inn)   # HQQLinearTritonSavable.repack
    return {prefix + "W_q": pack01(codes, nbits), prefix + "meta.scale_q": scale_q,
            prefix + "meta.meta_scale.scale": meta_scale["scale"].half(),
            prefix + "meta.meta_scale.zero": meta_scale["zero"].half(),
            prefix + "meta.zero_q": zero_q, prefix + "meta.meta_zero.scale": meta_zero["scale"].half(),
            prefix + "meta.meta_zero.zero": meta_zero["zero"].half()}


def authors_dequantize(t, prefix, shape, nbits, group_size):
    """Their MixtralBLockSparseTop2MLP_HQQ / HQQLinearTritonSavable.dequantize, in float32."""
    def deq(q, m):   # Quantizer.dequantize for 8-bit meta
        return (q.float() - m["zero"].float()) * m["scale"].float()
    scale = deq(t[prefix + "meta.scale_q"], {"scale": t[prefix + "meta.meta_scale.scale"],
                                            "zero": t[prefix + "meta.meta_scale.zero"]}).reshape(1, -1)
    zero = deq(t[prefix + "meta.zero_q"], {"scale": t[prefix + "meta.meta_zero.scale"],
                                          "zero": t[prefix + "meta.meta_zero.zero"]}).reshape(1, -1)
    W = unpack01(t[prefix + "W_q"], nbits)[:shape[0]].float().reshape(group_size, -1)
    return ((W - zero) * scale).reshape(shape)


@pytest.mark.parametrize("nbits,group_size,scale_group", [(2, 16, 128), (4, 64, 16), (3, 64, 32), (8, 32, 16)])
def test_dequantize_matches_the_authors_reconstruction(nbits, group_size, scale_group):
    torch.manual_seed(nbits)
    W = torch.randn(96, 64)          # 3-bit: 96 rows are padded to 100 (10 codes per int32)
    t = hqq01_linear(W, nbits, group_size, scale_group, "p.")
    ours = dequantize_hqq01(t, "p.", tuple(W.shape))
    theirs = authors_dequantize(t, "p.", tuple(W.shape), nbits, group_size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    rel = ((ours - W).norm() / W.norm()).item()
    assert rel < {2: 0.5, 3: 0.25, 4: 0.12, 8: 0.01}[nbits], rel


def test_a_wrong_size_is_named():
    t = hqq01_linear(torch.randn(64, 64), 2, 16, 128, "q.")
    with pytest.raises(ValueError, match="q.W_q has"):
        dequantize_hqq01(t, "q.", (64, 96))


# -- a whole checkpoint in the authors' layout ------------------------------------------------------
ATTN = (4, 64, 16)      # the demo: 4-bit group 64, scale group 256 (16 here: the matrices are tiny)
EXPERT = (2, 16, 128)   # the demo: 2-bit group 16, scale group 128


def write_authors_checkpoint(src: Path, out: Path) -> Path:
    """What the authors uploaded: a trunk file (full names, HQQ attention) and one file per expert
    (short names), tied together by model.safetensors.index.json."""
    out.mkdir(parents=True)
    trunk, experts = {}, {}
    for name, t in iter_tensors(src, shard_map(src)):
        parts = name.split(".")
        if ".self_attn." in name:
            trunk.update(hqq01_linear(t, *ATTN, prefix=name.removesuffix("weight")))
        elif ".block_sparse_moe.experts." in name:
            layer, expert, w = int(parts[2]), int(parts[5]), parts[6]
            experts.setdefault((layer, expert), {}).update(hqq01_linear(t, *EXPERT, prefix=f"{w}."))
        else:
            trunk[name] = t.half()
    weight_map = {k: "model-trunk.safetensors" for k in trunk}
    save_file(trunk, str(out / "model-trunk.safetensors"))
    for (layer, expert), t in experts.items():
        fname = f"model-expert-{layer}-{expert}.safetensors"
        save_file(t, str(out / fname))
        weight_map.update({f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{k}": fname for k in t})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    src = write_checkpoint(root / "original", layers=2, experts=4, top_k=2, heads=4, kv_heads=2, hidden=64,
                           intermediate=128, vocab=128, seed=3)
    return src, write_authors_checkpoint(src, root / "demo")


def test_every_tensor_comes_back_under_its_original_name(authors):
    src, demo = authors
    source = authors_source(demo)
    got = {}
    for shard in source.shards:
        got.update(dict(source.tensors(shard, source.fetch(shard))))
    original = dict(iter_tensors(src, shard_map(src)))
    assert set(got) == set(original)
    for name, w in original.items():
        tol = 0.6 if ".experts." in name else (0.15 if "_proj" in name else 1e-3)
        rel = ((got[name].float() - w.float()).norm() / w.float().norm()).item()
        assert rel < tol, (name, rel)


def test_dense_conversion_runs_like_the_dequantized_model(authors, tmp_path):
    _, demo = authors
    dense = authors_to_dense(demo, tmp_path / "dense", dtype=torch.float32)
    ref = MixtralForCausalLM.from_pretrained(dense, dtype=torch.float32)
    model = moe_colab.load_model(dense, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=1,
                                 progress=False)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_convert_equals_quantizing_the_dequantized_weights(authors, tmp_path):
    """Converting straight from the authors' files (one file at a time) gives exactly what
    moe_colab.quantize gives on their dequantized checkpoint, and it loads."""
    _, demo = authors
    dense = authors_to_dense(demo, tmp_path / "dense", dtype=torch.float32)
    ref = moe_colab.quantize(dense, tmp_path / "ref", "paper-2bit", device="cpu", progress=False)
    dst = convert_authors_checkpoint(tmp_path / "ours", demo, "paper-2bit", device="cpu", progress=False)
    assert_same_quantization(dst, ref)
    model = moe_colab.load_model(dst, device="cpu", dtype=torch.float32, experts_on_device=2, progress=False)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    assert (demo / "model-trunk.safetensors").is_file(), "a local source must never be deleted"


def test_not_the_authors_layout(tmp_path):
    src = write_checkpoint(tmp_path / "plain", layers=1, experts=2, top_k=1, hidden=64, intermediate=128,
                           shard_size="100KB")
    with pytest.raises(ValueError, match="experts.0.w1.W_q"):
        authors_source(src)
