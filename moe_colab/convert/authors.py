"""Reading the checkpoint the paper's authors published for their Colab demo, and converting it.

Hub id: lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo (HQQ 0.1 tensors, 4-bit attention
group 64 with scales meta-quantized in groups of 256, 2-bit experts group 16 with scale groups of
128). Its layout, as the authors' loader (dvmazur/mixtral-offloading, src/build_model.py and
src/custom_layers.py) reads it:

    config.json, model.safetensors.index.json         weight_map: tensor name -> file
    file of "model.embed_tokens.weight"               the whole trunk, full names; each attention
                                                      projection as an HQQ 0.1 linear (below)
    file of "model.layers.L.block_sparse_moe.experts.E.w1.W_q"
                                                      one expert, short names "w1.W_q", ... "w3..."

An HQQ 0.1 linear with prefix p (W [out, in], N = out*in, group g, HQQ "axis=0"):

    p.W_q                          codes, packed along dim 0 (4-bit: 2 per uint8, high nibble first;
                                   2-bit: 4 per uint8, high bits first; 3-bit: 10 per int32);
                                   unpacked and flattened, the first N codes are W's row-major order
    p.meta.scale_q, p.meta.meta_scale.{scale,zero}    8-bit scales, grouped like the codes
    p.meta.zero_q,  p.meta.meta_zero.{scale,zero}     8-bit zeros (one affine code per matrix)
    (or p.meta.scale / p.meta.zero unquantized)

HQQ 0.1 groups a matrix as W.reshape(g, N/g): group c holds the flat entries c, c + N/g, ... (a
column of that view), and W = (Q - Z[c]) * S[c]; the meta-quantized scales decode the same way
one level down: S = (scale_q - zero) * scale over scale_q's columns. The stored scale is already
inverted (a multiplier).

Those groups are strided, ours (packing.py) are consecutive inputs of one row, so the codes
cannot be copied: ``dequantize_hqq01`` rebuilds each matrix exactly (in float32), and
``convert_authors_checkpoint`` quantizes it again into our format, shard by shard like
moe_colab.convert.hub (a second quantization: its error adds to the authors'). ``authors_to_dense``
writes the dequantized weights as an ordinary checkpoint (small models; Mixtral would be 93 GB).

References: HQQ 0.1.x, hqq/core/quantize.py and bitpack.py (Quantizer.quantize/dequantize,
BaseQuantizeConfig); Eliseev & Mazur, arXiv 2312.17238, section 3.3.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..adapters.mixtral import MixtralAdapter as A
from ..checkpoint import INDEX_FILE, CheckpointError

DEMO_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
_HQQ_KEY = re.compile(r"^(.*)\.(W_q|bias|meta\.(?:scale_q|zero_q|scale|zero|meta_scale\.(?:scale|zero)|"
                      r"meta_zero\.(?:scale|zero)))$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def unpack_hqq01(W_q: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ 0.1 codes packed along dim 0 -> uint8 codes [rows * per-word, cols] (padding rows kept).

    4-bit ('4bit_u8'): 2 per byte, the first half of the rows in the high nibble; 2-bit ('2bit_u8'):
    4 per byte, first quarter in the top bits; 3-bit ('3bit_32'): 10 per int32, first tenth at
    bits 27-29; 8-bit: as is."""
    if bits == 3:
        if W_q.dtype != torch.int32:
            raise CheckpointError(f"3-bit HQQ 0.1 codes are int32, got {W_q.dtype}")
        return torch.cat([(W_q >> (27 - 3 * i)) & 7 for i in range(10)], dim=0).to(torch.uint8)
    if W_q.dtype != torch.uint8:
        raise CheckpointError(f"{bits}-bit HQQ 0.1 codes are uint8, got {W_q.dtype}")
    if bits == 8:
        return W_q
    mask = (1 << bits) - 1
    return torch.cat([(W_q >> (8 - bits * (s + 1))) & mask for s in range(8 // bits)], dim=0)


def _decode(q, scale, zero) -> torch.Tensor:
    """(q - zero) * scale over q's columns (HQQ 0.1 axis=0), flattened row-major, float32."""
    q = q.float()
    q = q.reshape(-1, q.shape[-1]) if q.dim() > 1 else q.reshape(1, -1)
    return ((q - zero.float().reshape(1, -1)) * scale.float().reshape(1, -1)).reshape(-1)


def dequantize_hqq01(t: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int]) -> torch.Tensor:
    """W [out, in] float32 from the HQQ 0.1 tensors ``prefix + "W_q"``, ``prefix + "meta..."``."""
    out, inn = shape
    n = out * inn
    W_q = t[prefix + "W_q"]
    if W_q.dtype == torch.int32:
        bits = 3
    else:
        bits = {2.0: 4, 4.0: 2, 1.0: 8}.get(n / W_q.numel())
        if bits is None:
            raise CheckpointError(f"{prefix}W_q has {W_q.numel()} bytes for a {out}x{inn} matrix: not 2-, 4- "
                                  f"or 8-bit HQQ 0.1 codes")
    Q = unpack_hqq01(W_q, bits)
    Q = Q.reshape(-1)[:n]                                         # W's row-major order
    if prefix + "meta.scale" in t:
        S = t[prefix + "meta.scale"].float().reshape(-1)
    else:
        S = _decode(t[prefix + "meta.scale_q"], t[prefix + "meta.meta_scale.scale"],
                    t[prefix + "meta.meta_scale.zero"])
    if prefix + "meta.zero" in t:
        Z = t[prefix + "meta.zero"].float().reshape(-1)
    else:
        Z = _decode(t[prefix + "meta.zero_q"], t[prefix + "meta.meta_zero.scale"], t[prefix + "meta.meta_zero.zero"])
    if S.numel() != Z.numel() or n % S.numel():
        raise CheckpointError(f"{prefix}meta: {S.numel()} scales and {Z.numel()} zeros do not group a "
                              f"{out}x{inn} matrix")
    g = n // S.numel()
    W = (Q.float().reshape(g, -1) - Z.reshape(1, -1)) * S.reshape(1, -1)   # [g, N/g]: groups are columns
    return W.reshape(out, inn)


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    i = config["intermediate_size"]
    return {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd),
            "w1": (i, h), "w2": (h, i), "w3": (i, h)}


class AuthorsShards:
    """The authors' checkpoint as a shard source for moe_colab.convert.quantize.quantize_shards: each file
    yields the ORIGINAL checkpoint's names with dequantized float32 tensors."""

    def __init__(self, fetch, identity: str, delete_after: bool):
        self.fetch_file, self.identity, self.delete_after = fetch, identity, delete_after
        self.config = json.loads(Path(fetch("config.json")).read_text())
        weight_map = json.loads(Path(fetch(INDEX_FILE)).read_text())["weight_map"]
        if "model.embed_tokens.weight" not in weight_map:
            raise CheckpointError(f"{identity}: {INDEX_FILE} does not say which file holds the trunk "
                                  f"(no model.embed_tokens.weight): not the authors' layout")
        self.trunk_file = weight_map["model.embed_tokens.weight"]
        self.experts: dict[str, list[tuple[int, int]]] = {}
        L, E = self.config["num_hidden_layers"], self.config["num_local_experts"]
        for l in range(L):
            for e in range(E):
                key = f"model.layers.{l}.block_sparse_moe.experts.{e}.w1.W_q"
                if key not in weight_map:
                    raise CheckpointError(f"{identity}: {INDEX_FILE} has no {key}")
                self.experts.setdefault(weight_map[key], []).append((l, e))
        self.shapes = _linear_shapes(self.config)
        self.names = {self.trunk_file: ["model.embed_tokens.weight"]}
        for f, ids in self.experts.items():
            self.names.setdefault(f, []).extend(A.expert_key(l, e, w) for l, e in ids for w in ("w1", "w2", "w3"))

    @property
    def shards(self) -> list[str]:
        return [self.trunk_file] + sorted(f for f in self.names if f != self.trunk_file)

    def fetch(self, shard: str) -> Path:
        return Path(self.fetch_file(shard))

    def release(self, shard: str, path: Path) -> None:
        if self.delete_after:
            Path(path).unlink(missing_ok=True)

    def small_files(self) -> dict[str, Path]:
        return {"config.json": Path(self.fetch_file("config.json"))}

    def tensors(self, shard: str, path: Path):
        from safetensors.torch import load_file
        t = load_file(str(path))
        if shard == self.trunk_file:
            yield from self._trunk(t, shard)
        for l, e in self.experts.get(shard, []):
            full = f"model.layers.{l}.block_sparse_moe.experts.{e}."
            prefix = full if full + "w1.W_q" in t else ""
            for w in ("w1", "w2", "w3"):
                if prefix + w + ".W_q" not in t:
                    raise CheckpointError(f"{shard}: no {prefix}{w}.W_q for expert {e} of layer {l}")
                yield A.expert_key(l, e, w), dequantize_hqq01(t, f"{prefix}{w}.", self.shapes[w])

    def _trunk(self, t: dict, shard: str):
        hqq_prefixes = {}
        for key in t:
            m = _HQQ_KEY.match(key)
            if m and ".block_sparse_moe.experts." not in key:
                hqq_prefixes.setdefault(m[1], []).append(key)
        for prefix in sorted(hqq_prefixes):
            proj = prefix.rsplit(".", 1)[-1]
            if proj not in self.shapes:
                raise CheckpointError(f"{shard}: HQQ tensors under {prefix!r}, which is no attention projection")
            if prefix + ".bias" in t:
                raise CheckpointError(f"{shard}: {prefix} has a bias; Mixtral's projections have none")
            yield prefix + ".weight", dequantize_hqq01(t, prefix + ".", self.shapes[proj])
        claimed = {k for keys in hqq_prefixes.values() for k in keys}
        for key, value in t.items():
            if key not in claimed and not _IGNORED.search(key) and ".block_sparse_moe.experts." not in key:
                yield key, value


def authors_source(path_or_id=DEMO_REPO, *, revision=None, scratch=None, fetch=None) -> AuthorsShards:
    """A local directory in the authors' layout, or their Hub repository (files downloaded one by one
    into ``scratch`` and deleted once converted)."""
    local = Path(str(path_or_id)).expanduser()
    if fetch is None and local.is_dir():
        return AuthorsShards(lambda name: local / name, identity=str(local), delete_after=False)
    if fetch is None:
        import tempfile
        from .hub import hub_fetcher
        fetch = hub_fetcher(str(path_or_id), scratch or tempfile.mkdtemp(prefix="moe_colab_authors_"),
                            revision=revision)
    return AuthorsShards(fetch, identity=f"{path_or_id}@{revision or 'main'}", delete_after=True)


def convert_authors_checkpoint(dst, path_or_id=DEMO_REPO, quant="paper-2bit", *, revision=None, scratch=None,
                               fetch=None, device=None, dtype=torch.float16, progress=True) -> Path:
    """The authors' checkpoint, dequantized and quantized again into our format in ``dst``
    (resumable, one file at a time); then ``moe_colab.load_model(dst)``."""
    from .quantize import quantize_shards
    source = authors_source(path_or_id, revision=revision, scratch=scratch, fetch=fetch)
    return quantize_shards(source, dst, quant, device=device, dtype=dtype, progress=progress)


def authors_to_dense(path_or_id, out, *, dtype=torch.float16, fetch=None) -> Path:
    """Write the dequantized weights as an ordinary (original-layout) checkpoint in ``out``:
    one safetensors file per source file. Mixtral-8x7B would take ~93 GB: for small models."""
    from safetensors.torch import save_file
    source = authors_source(path_or_id, fetch=fetch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(source.shards):
        path = source.fetch(shard)
        tensors = {name: v.to(dtype) if v.is_floating_point() else v for name, v in source.tensors(shard, path)}
        source.release(shard, path)
        fname = f"model-{i + 1:05d}-of-{len(source.shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(source.config, indent=1))
    return out
