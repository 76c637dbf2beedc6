"""Quantize a checkpoint once, into a directory that load_model reads directly.

    moe_colab.quantize("mistralai/Mixtral-8x7B-v0.1", "mixtral-2bit", quant="paper-2bit")
    python -m moe_colab quantize SRC DST --quant paper-2bit          (main_quantize)

Two drivers feed the one writer (writer.py: units, manifest, resume, identity):

    quantize(src, dst)          a local checkpoint (or "tiny", or a Hub snapshot): the trunk
                                first, then each layer in order, one tensor at a time (safe_open),
                                so host memory holds about one shard's trunk tensors plus the
                                expert buffers of the layer(s) being filled
    quantize_shards(source, dst) any shard source (hub.HubShards, authors.AuthorsShards): one
                                shard at a time, fetched, quantized and released; layers that
                                straddle shards are kept as parts between shards

Rerunning after an interruption verifies the recorded units and does only the rest.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.3 (mixed HQQ quantization).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..adapters.mixtral import MixtralAdapter
from ..checkpoint import CheckpointError, read_config_dict, resolve, shard_map
from ..quant.config import PRESETS, QuantConfig, resolve_quant
from .manifest import TRUNK_FILE, layer_file
from .writer import QuantizedDirWriter, fresh_manifest

_ATTN_KEY = re.compile(r"^(model\.layers\.\d+\.self_attn\.(\w+))\.weight$")
WEIGHTS = ("w1", "w2", "w3")


def quantize_trunk_tensor(name: str, t: torch.Tensor, qcfg: QuantConfig, device, adapter=MixtralAdapter,
                          config=None) -> dict[str, torch.Tensor]:
    """One non-expert tensor -> the trunk entries it becomes: an attention projection (the
    family's: adapter.attention_projections) as QuantLinear buffers when attention is quantized,
    anything else unchanged, under its transformers name."""
    from ..quant.matrix import quantize_matrix
    attn_bits, g, sg = qcfg.matrix("attn")
    name = adapter.trunk_key(name)
    projections = adapter.attention_projections(config) if config is not None else ("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj")
    m = _ATTN_KEY.match(name)
    if m and m[2] in projections and attn_bits != 16:
        return {f"{m[1]}.{k}": v for k, v in quantize_matrix(t.to(device), attn_bits, g, sg).items()}
    return {name: t}


def _prepare(config_dict: dict, identity: str, quant, dtype, device, shards: dict | None = None):
    """(config, QuantConfig, format, device, fresh manifest, adapter): every check before anything
    is written."""
    from ..quant.format import expert_format
    from ..quant.matrix import default_device
    qcfg = resolve_quant(quant)
    if qcfg is None or qcfg.is_noop:
        raise ValueError("quant selects no quantization (16-bit attention and experts): there is nothing "
                         "to write; load the original checkpoint instead")
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{identity}: config.json holds a {type(config_dict).__name__}, not settings")
    try:
        A = adapter_for(config_dict.get("model_type"))
    except ValueError as e:
        raise CheckpointError(f"{identity}: {e}") from None
    config = A.prepare_config(A.config_class().from_dict(config_dict))
    qcfg.validate_for(config)
    device = torch.device(device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; pass device='cpu' "
                           "(slower) or run on a GPU")
    fmt = expert_format(config, qcfg, dtype)
    fresh = fresh_manifest(model_type=A.model_type, config=config, qcfg=qcfg, dtype=dtype, fmt=fmt,
                           source=identity, shards=shards)
    return config, qcfg, fmt, device, fresh, A


def _check_destination(src_dir: Path, dst: Path) -> None:
    src, out = src_dir.resolve(), dst.resolve()
    if out == src or src in out.parents:
        raise ValueError(f"the output directory {dst} is (inside) the source checkpoint {src_dir}: choose "
                         f"another directory")


def quantize(src, dst, quant="paper-2bit", *, device=None, dtype: torch.dtype = torch.float16,
             progress: bool = True, verify_existing: bool = True, on_unit_done=None) -> Path:
    """Quantize checkpoint ``src`` (local dir, "tiny" or Hub id) into directory ``dst``.

    quant: a preset ("paper-2bit", "paper-3bit") or a QuantConfig. device: where hqq runs
    (default CUDA if available). dtype: storage dtype of 16-bit experts (expert_bits=16).
    on_unit_done(name): called after each unit ("trunk.safetensors", "layer_000.safetensors", ...)
    is safely on disk. Returns dst as a Path; rerunning on a finished directory is a no-op.
    """
    src_dir, dst = resolve(src), Path(dst)
    _check_destination(src_dir, dst)
    shards = shard_map(src_dir)
    sizes = {name: (src_dir / name).stat().st_size for name in shards}
    config, qcfg, fmt, device, fresh, A = _prepare(read_config_dict(src_dir), str(src), quant, dtype, device, sizes)
    writer = QuantizedDirWriter(dst, fresh, verify_existing=verify_existing)
    if writer.complete:
        return dst
    n_experts = A.num_experts(config)
    reader = A.expert_reader(config)             # per-expert, fused or MXFP4 -> w1/w2/w3 (+ biases)
    per_expert = len(A.expert_fn(config).names)
    shapes = A.expert_shapes(config)

    todo_trunk, todo_experts = [], []
    for shard, names in shards.items():
        for name in names:
            layer = reader.layer_of(name)          # the MoE layer, or None for a trunk tensor
            if layer is None:
                if not writer.has(TRUNK_FILE):
                    todo_trunk.append((shard, name))
            elif not writer.has(layer_file(layer)):
                key = A.parse_expert_key(name)     # per-expert names sort by expert too
                todo_experts.append((shard, name, (layer, key[1] if key else -1, name)))
    # experts in (layer, expert) order, so shards are visited in layer order and a layer that
    # straddles two shards completes in the next one: at most about two layers are open at once
    todo_experts.sort(key=lambda item: item[2])

    from safetensors import safe_open
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo_trunk) + len(todo_experts), desc=f"quantize {qcfg.name}", unit="tensor",
               disable=not progress)

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
                param = reader.trunk_name(name)
                if param is not None:              # None: transformers ignores it too
                    trunk.update(quantize_trunk_tensor(param, t, qcfg, device, A, config))
            writer.save_unit(TRUNK_FILE, trunk)
            del trunk
            if on_unit_done:
                on_unit_done(TRUNK_FILE)

        open_layers: dict[int, tuple[torch.Tensor, set]] = {}   # layer -> (uint8 [E, nbytes], written)
        for (shard, name, _), t in tensors_of(todo_experts):
            for layer, expert, w, piece in reader.feed(name, t):
                buf, written = open_layers.setdefault(
                    layer, (torch.zeros(n_experts, fmt.layout.nbytes, dtype=torch.uint8), set()))
                _write_expert_matrix(fmt, qcfg, buf[expert], w, piece, device, A.expert_key(
                    A.moe_layers(config)[layer], expert, w), shard, shapes)
                written.add((expert, w))
                if len(written) == per_expert * n_experts:
                    writer.save_unit(layer_file(layer), {"experts": buf})
                    del open_layers[layer]
                    if on_unit_done:
                        on_unit_done(layer_file(layer))
    finally:
        bar.close()
    return writer.finish()


def _write_expert_matrix(fmt, qcfg, row: torch.Tensor, w: str, t: torch.Tensor, device, key: str,
                         shard_of: str, shapes: dict) -> None:
    """One original expert matrix (or bias) into its expert's packed buffer (quantized by hqq on
    ``device``; 16-bit experts and biases are only copied); a wrong shape names the tensor
    (``key``: its checkpoint name, layer and expert) and the shard."""
    want = shapes.get(w)
    if want is not None and tuple(t.shape) != tuple(want):
        raise CheckpointError(f"{shard_of}: {key} has shape {tuple(t.shape)}, the config needs {tuple(want)}")
    try:
        fmt.write(fmt.layout.views(row), w, t if qcfg.expert_bits == 16 or w[0] == "b" else t.to(device))
    except ValueError as e:
        raise CheckpointError(f"{shard_of}: {key}: {e}") from e


def quantize_shards(source, dst, quant, *, device=None, dtype=torch.float16, progress=True,
                    on_shard_done=None) -> Path:
    """Write ``source`` (hub.HubShards, authors.AuthorsShards, or any object with config, identity,
    shards, fetch, tensors, release, small_files) into a quantized directory, shard by shard."""
    from tqdm.auto import tqdm
    config, qcfg, fmt, device, fresh, A = _prepare(source.config, source.identity, quant, dtype, device)
    writer = QuantizedDirWriter(dst, fresh)
    done = set(writer.shards_done())
    reader = A.expert_reader(config)

    def needed(shard) -> bool:
        names = getattr(source, "names", {}).get(shard)
        if shard in done:
            return False
        if not names:
            return True
        layers = {reader.layer_of(n) for n in names} - {None}
        trunk = any(reader.layer_of(n) is None for n in names)
        return (trunk and not writer.has(TRUNK_FILE)) or any(not writer.has(layer_file(l)) for l in layers)

    if not writer.complete:
        for shard in tqdm(source.shards, desc=f"quantize {qcfg.name}", unit="shard", disable=not progress):
            if not needed(shard):
                continue
            path = source.fetch(shard)
            try:
                _quantize_shard(source, shard, path, writer, qcfg, fmt, A, config, reader, device)
            finally:
                source.release(shard, path)
            writer.mark_shard_done(shard)
            if on_shard_done:
                on_shard_done(shard)
        writer.trunk_from_parts()
    return writer.finish(source.small_files())


def _quantize_shard(source, shard, path, writer: QuantizedDirWriter, qcfg, fmt, A, config, reader, device) -> None:
    """Quantize one shard's tensors; save its trunk part and every layer it touched."""
    E, names, shapes = A.num_experts(config), A.expert_fn(config).names, A.expert_shapes(config)
    trunk, layers = {}, {}
    for name, t in source.tensors(shard, path):
        layer = reader.layer_of(name)
        if layer is None:
            param = reader.trunk_name(name)
            if not writer.has(TRUNK_FILE) and param is not None:
                trunk.update(quantize_trunk_tensor(param, t, qcfg, device, A, config))
            continue
        if writer.has(layer_file(layer)):
            continue
        for layer, expert, w, piece in reader.feed(name, t):
            if layer not in layers:
                layers[layer] = writer.load_partial(layer, E, fmt.layout.nbytes, len(names))
            buf, written = layers[layer]
            _write_expert_matrix(fmt, qcfg, buf[expert], w, piece, device,
                                 A.expert_key(A.moe_layers(config)[layer], expert, w), shard, shapes)
            written[expert, names.index(w)] = 1
    if trunk:
        writer.save_trunk_part(shard, trunk)
    for layer, (buf, written) in sorted(layers.items()):
        writer.save_layer(layer, buf, written)


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
