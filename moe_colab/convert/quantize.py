"""Quantize a Mixtral checkpoint once, into a directory that load_model reads directly.

    moe_colab.quantize("mistralai/Mixtral-8x7B-v0.1", "mixtral-2bit", quant="paper-2bit")
    python -m moe_colab quantize SRC DST --quant paper-2bit          (main_quantize)

The original checkpoint is streamed shard by shard, one tensor at a time (safe_open), so host
memory holds about one shard's worth of trunk tensors plus the expert buffers of the layer(s)
being filled. Work is split in units, the trunk and then each layer; a finished unit is written
to a temporary file, renamed, and recorded (size, sha256, tensors) in the manifest, which is
itself replaced atomically. Rerunning after an interruption verifies the recorded units and
does only the rest. The directory layout is described in manifest.py.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.3 (mixed HQQ quantization).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..adapters.mixtral import MixtralAdapter as A
from ..checkpoint import CheckpointError, read_config_dict, resolve, shard_map
from ..quant.config import PRESETS, QuantConfig, resolve_quant
from ..quant.format import expert_format
from .manifest import (FORMAT, FORMAT_VERSION, MANIFEST, TRUNK_FILE, dtype_name, file_entry, layer_file,
                       read_manifest, verify_file, write_manifest)
from ..quant.matrix import default_device, quantize_matrix

_ATTN_KEY = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj)\.weight$")


def quantize_trunk_tensor(name: str, t: torch.Tensor, qcfg: QuantConfig, device) -> dict[str, torch.Tensor]:
    """One non-expert checkpoint tensor -> the trunk entries it becomes: an attention projection
    as QuantLinear buffers (when attention is quantized), anything else unchanged."""
    attn_bits, g, sg = qcfg.matrix("attn")
    m = _ATTN_KEY.match(name)
    if m and attn_bits != 16:
        return {f"{m[1]}.{k}": v for k, v in quantize_matrix(t.to(device), attn_bits, g, sg).items()}
    return {A.trunk_key(name): t}


def _save_unit(dst: Path, name: str, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    from safetensors.torch import save_file
    tmp = dst / (name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dst / name)
    manifest["files"][name] = file_entry(dst / name, tensors)
    write_manifest(dst, manifest)


def _start_or_resume(dst: Path, fresh: dict, verify: bool) -> dict:
    """The manifest to continue from: ``fresh`` for a new directory, the recorded one (with only
    its intact files kept) when resuming the same job; raises for a different job."""
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / MANIFEST).is_file():
        write_manifest(dst, fresh)
        return fresh
    old = read_manifest(dst)
    identity = ("scheme", "config", "expert_layout", "expert_dtype")
    if any(old.get(k) != fresh[k] for k in identity):
        raise ValueError(f"{dst} already holds a different quantization ({old.get('scheme_name')!r} of "
                         f"another checkpoint or with other settings); choose an empty directory or delete it")
    finished = old.get("complete", False)      # a finished run: sizes and headers suffice
    for name, entry in list(old["files"].items()):
        try:
            verify_file(dst, name, entry, checksum=verify and not finished)
        except CheckpointError as e:
            warnings.warn(f"redoing {name}: {e}")
            del old["files"][name]
    old["complete"] = False
    write_manifest(dst, old)
    return old


def quantize(src, dst, quant="paper-2bit", *, device=None, dtype: torch.dtype = torch.float16,
             progress: bool = True, verify_existing: bool = True, on_unit_done=None) -> Path:
    """Quantize checkpoint ``src`` (local dir, "tiny" or Hub id) into directory ``dst``.

    quant: a preset ("paper-2bit", "paper-3bit") or a QuantConfig. device: where hqq runs
    (default CUDA if available). dtype: storage dtype of 16-bit experts (expert_bits=16).
    on_unit_done(name): called after each unit ("trunk.safetensors", "layer_000.safetensors", ...)
    is safely on disk. Returns dst as a Path; rerunning on a finished directory is a no-op.
    """
    qcfg = resolve_quant(quant)
    if qcfg is None or qcfg.is_noop:
        raise ValueError("quant selects no quantization (16-bit attention and experts): there is nothing "
                         "to write; load the original checkpoint instead")
    src_dir, dst = resolve(src), Path(dst)
    cfg_dict = read_config_dict(src_dir)
    if cfg_dict.get("model_type") != A.model_type:
        raise CheckpointError(f"{src_dir}/config.json has model_type {cfg_dict.get('model_type')!r}; only "
                              f"'{A.model_type}' checkpoints can be quantized")
    config = A.config_class().from_dict(cfg_dict)
    qcfg.validate_for(config)
    shards = shard_map(src_dir)
    device = torch.device(device or default_device())
    fmt = expert_format(config, qcfg, dtype)
    n_layers, n_experts = A.num_layers(config), A.num_experts(config)

    fresh = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": A.model_type,
             "scheme_name": qcfg.name, "scheme": qcfg.to_dict(), "config": config.to_dict(),
             "source": str(src), "expert_dtype": dtype_name(dtype), "expert_nbytes": fmt.layout.nbytes,
             "expert_layout": [[s.name, list(s.shape), dtype_name(s.dtype), s.offset] for s in fmt.layout.specs],
             "files": {}, "complete": False}
    fresh = json.loads(json.dumps(fresh))   # as it will read back from disk, for the resume check
    manifest = _start_or_resume(dst, fresh, verify_existing)
    done = set(manifest["files"])

    todo_trunk, todo_experts = [], []
    for shard, names in shards.items():
        for name in names:
            if A.is_fused_expert_key(name):
                raise CheckpointError(f"{shard}: fused expert tensor {name!r} (transformers-5 layout) is not "
                                      f"supported; save the checkpoint in the original layout")
            key = A.parse_expert_key(name)
            if key is None:
                if TRUNK_FILE not in done:
                    todo_trunk.append((shard, name))
            elif layer_file(key[0]) not in done:
                todo_experts.append((shard, name, key))
    # experts in (layer, expert) order, so shards are visited in layer order and a layer that
    # straddles two shards completes in the next one: at most about two layers are open at once
    todo_experts.sort(key=lambda item: item[2])
    total = len(todo_trunk) + len(todo_experts)

    from safetensors import safe_open
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=f"quantize {qcfg.name}", unit="tensor", disable=not progress)

    def tensors_of(todo):
        """(item, tensor) for a list of (shard, name, ...) items, one open shard at a time."""
        for shard in dict.fromkeys(item[0] for item in todo):
            with safe_open(str(src_dir / shard), framework="pt") as f:
                for item in (i for i in todo if i[0] == shard):
                    yield item, f.get_tensor(item[1])
                    bar.update(1)

    try:
        if todo_trunk:    # unit 1: the trunk (attention projections quantized, the rest kept)
            trunk = {}
            for (_, name), t in tensors_of(todo_trunk):
                trunk.update(quantize_trunk_tensor(name, t, qcfg, device))
            _save_unit(dst, TRUNK_FILE, trunk, manifest)
            del trunk
            if on_unit_done:
                on_unit_done(TRUNK_FILE)

        open_layers: dict[int, tuple[torch.Tensor, set]] = {}   # layer -> (uint8 [E, nbytes], written)
        for (_, _, (layer, expert, w)), t in tensors_of(todo_experts):
            buf, written = open_layers.setdefault(
                layer, (torch.zeros(n_experts, fmt.layout.nbytes, dtype=torch.uint8), set()))
            # hqq runs on `device`; 16-bit experts are only copied (and cast) into the buffer
            fmt.write(fmt.layout.views(buf[expert]), w, t if qcfg.expert_bits == 16 else t.to(device))
            written.add((expert, w))
            if len(written) == 3 * n_experts:
                _save_unit(dst, layer_file(layer), {"experts": buf}, manifest)
                del open_layers[layer]
                if on_unit_done:
                    on_unit_done(layer_file(layer))
    finally:
        bar.close()

    missing = [n for n in [TRUNK_FILE] + [layer_file(l) for l in range(n_layers)] if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{src_dir} lacks tensors for {missing} (e.g. some experts of those layers)")
    manifest["complete"] = True
    write_manifest(dst, manifest)
    return dst


def parse_quant_arg(text: str) -> QuantConfig:
    """CLI spelling of a scheme: a preset name, or "ATTN,EXPERT" bits such as "4,2" or "16,3"."""
    if "," in text:
        try:
            attn, expert = (int(b) for b in text.split(","))
        except ValueError:
            raise ValueError(f"--quant {text!r}: expected two bit widths like '4,2'") from None
        return QuantConfig(attn, expert)
    qcfg = resolve_quant(text)
    if qcfg is None:
        raise ValueError(f"--quant {text!r} selects no quantization")
    return qcfg


def add_quantize_arguments(parser) -> None:
    """Arguments of `python -m moe_colab quantize` (for the CLI in moe_colab/__main__.py)."""
    parser.add_argument("src", help="original checkpoint: a directory, 'tiny' or a Hub id")
    parser.add_argument("dst", help="output directory (resumed if it holds an unfinished run)")
    parser.add_argument("--quant", default="paper-2bit",
                        help=f"scheme: one of {sorted(PRESETS)} or 'ATTN,EXPERT' bits, e.g. '4,2' (default paper-2bit)")
    parser.add_argument("--device", default=None, help="where hqq runs (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_quantize(args) -> int:
    """Entry point for an argparse namespace with src, dst, quant (+ optional device, no_progress)."""
    qcfg = parse_quant_arg(args.quant) if isinstance(args.quant, str) else resolve_quant(args.quant)
    dst = quantize(args.src, args.dst, qcfg, device=getattr(args, "device", None),
                   progress=not getattr(args, "no_progress", False))
    print(f"quantized {args.src} -> {dst} ({qcfg.describe()})")
    return 0


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m moe_colab.convert.quantize", description=__doc__.splitlines()[0])
    add_quantize_arguments(p)
    raise SystemExit(main_quantize(p.parse_args()))
