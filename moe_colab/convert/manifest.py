"""Reading a quantized directory back: its JSON manifest, checks, and the loader-side API.

A directory written by ``moe_colab.quantize`` holds

    moe_colab_quant.json        the manifest: format version, scheme (QuantConfig), the original
                                config.json, what it was made from (source id, config sha256,
                                shard sizes), the expert buffer layout, and per file its size,
                                sha256 and tensors (shape, dtype); written by writer.py only
    moe_colab_verified.json     which files were checked against their sha256, keyed by size and
                                mtime: a file changed since then is checked again
    trunk.safetensors           every non-expert tensor under transformers-5 parameter names;
                                quantized attention projections as QuantLinear buffers
                                (model.layers.L.self_attn.q_proj.q4, ...s_q, ...)
    layer_000.safetensors ...   "experts": uint8 [num_experts, nbytes], one packed buffer per
                                expert (the ExpertFormat layout), ready for ExpertStore; one file
                                per MoE layer (dense layers and shared experts are trunk)

Loading checks every unit against its sha256 while it reads it, unless the verified stamp says
the file is unchanged since its last check (the writer stamps what it writes, so the first load
after quantize costs no hashing); a mismatch names the file and says how to redo it.

Loader API (called by moe_colab.model.load_model):
    is_quantized_dir(path) -> bool
    open_quantized(path, quant=None) -> (manifest, QuantConfig)
    model_config(manifest) -> the family's transformers config (MixtralConfig, Qwen3MoeConfig, ...)
    expert_format_for(manifest, dtype, act) -> ExpertFormat (layout checked against the manifest)
    load_layer_experts(path, manifest, layer) -> uint8 [num_experts, nbytes]
    iter_quantized_experts(path, manifest) -> (layer, expert, uint8 [nbytes]) ...
    load_trunk_state_dict(path, manifest) -> {name: tensor}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, _safetensors_header
from ..quant.config import QuantConfig, resolve_quant

MANIFEST = "moe_colab_quant.json"
FORMAT = "moe_colab-quant"
FORMAT_VERSION = 1
TRUNK_FILE = "trunk.safetensors"
VERIFIED = "moe_colab_verified.json"
REQUIRED = ("model_type", "scheme_name", "scheme", "config", "source", "expert_dtype", "expert_nbytes",
            "expert_layout", "files", "complete")
_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32}
_ST_DTYPES = {"U8": "uint8", "F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """The manifest record of one written file (and its verified stamp: it was just hashed)."""
    sha = sha256_file(path)
    record_verified(path.parent, path.name, sha)
    return {"size": path.stat().st_size, "sha256": sha,
            "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in tensors.items()}}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def record_verified(directory: Path, name: str, sha: str | None) -> None:
    """Remember that ``name`` matched ``sha`` at its current size and mtime (best effort: a
    read-only directory is simply checked again next time); ``sha=None`` forgets its stamp (a
    file found damaged although its size and mtime are unchanged: bit rot)."""
    directory = Path(directory)
    f = directory / VERIFIED
    try:
        stamps = json.loads(f.read_text()) if f.is_file() else {}
        if sha is None:
            if stamps.pop(name, None) is None:
                return
        else:
            stamps[name] = _stat_key(directory / name) + [sha]
        tmp = directory / (VERIFIED + ".tmp")
        tmp.write_text(json.dumps(stamps, indent=1))
        os.replace(tmp, f)
    except (OSError, ValueError):
        pass


def is_verified(directory: Path, name: str, sha: str) -> bool:
    f = Path(directory) / VERIFIED
    try:
        stamp = json.loads(f.read_text()).get(name)
        return stamp == _stat_key(Path(directory) / name) + [sha]
    except (OSError, ValueError, AttributeError):
        return False


def check_sha256(directory: Path, name: str, entry: dict) -> None:
    """Hash ``name`` unless its stamp says it is unchanged since it last matched; raise naming it."""
    directory = Path(directory)
    if is_verified(directory, name, entry["sha256"]):
        return
    if sha256_file(directory / name) != entry["sha256"]:
        raise CheckpointError(f"{directory / name}: sha256 does not match {MANIFEST} (the file is corrupt or was "
                              f"changed); run moe_colab.quantize(src, {str(directory)!r}) again to redo it, or "
                              f"`python -m moe_colab verify {directory}`")
    record_verified(directory, name, entry["sha256"])


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomically: a crash leaves the previous manifest, never half of one."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / MANIFEST)


def is_quantized_dir(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path} is not a quantized directory (no {MANIFEST})")
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a moe_colab quantization manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format version {manifest.get('format_version')}, this moe_colab "
                              f"reads version {FORMAT_VERSION}; quantize the checkpoint again")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(f"{f} lacks {missing}: it was not written by moe_colab.quantize or was edited; "
                              f"quantize the checkpoint again")
    return manifest


def verify_file(directory: Path, name: str, entry: dict, *, checksum: bool = False) -> None:
    """Check one file against its manifest record; raise CheckpointError naming file and tensor."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{name} is listed in {MANIFEST} but missing from {directory}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"{name} has {size} bytes, {MANIFEST} says {entry['size']}: the file was "
                              f"changed or truncated")
    header = _safetensors_header(path)
    want, have = entry["tensors"], {k: v for k, v in header.items() if k != "__metadata__"}
    for t in sorted(set(want) | set(have)):
        if t not in have:
            raise CheckpointError(f"{name}: tensor {t!r} listed in {MANIFEST} is missing from the file")
        if t not in want:
            raise CheckpointError(f"{name}: tensor {t!r} is in the file but not in {MANIFEST}")
        got = (list(have[t]["shape"]), _ST_DTYPES.get(have[t]["dtype"], have[t]["dtype"]))
        if got != (list(want[t]["shape"]), want[t]["dtype"]):
            raise CheckpointError(f"{name}: tensor {t!r} is {got[0]} {got[1]} in the file, {MANIFEST} says "
                                  f"{want[t]['shape']} {want[t]['dtype']}")
    if checksum:
        try:
            check_sha256(directory, name, entry)
        except CheckpointError:
            raise CheckpointError(f"{name}: sha256 does not match {MANIFEST} (the file is corrupt)") from None


def open_quantized(path, quant=None, *, verify: str = "headers"):
    """(manifest, QuantConfig) of a finished quantized directory.

    ``quant`` (None, a preset name or a QuantConfig) is what the caller asked for: None accepts
    the directory's scheme, anything else must equal it. ``verify``: "none", "headers" (sizes,
    tensor names, shapes and dtypes) or "full" (also sha256 of every file).
    """
    if verify not in ("none", "headers", "full"):
        raise ValueError(f"verify must be 'none', 'headers' or 'full', got {verify!r}")
    path = Path(path)
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        raise CheckpointError(f"quantization into {path} did not finish; run moe_colab.quantize(src, "
                              f"{str(path)!r}, quant={manifest['scheme_name']!r}) again to resume it")
    qcfg = QuantConfig.from_dict(manifest["scheme"])
    wanted = resolve_quant(quant)
    if wanted is not None and wanted != qcfg:
        raise ValueError(f"{path} was quantized with {qcfg.name!r} ({qcfg.describe()}), but "
                         f"quant={wanted.name!r} ({wanted.describe()}) was requested; pass quant=None "
                         f"or {qcfg.name!r}, or quantize the original checkpoint again")
    if verify != "none":
        expected = {TRUNK_FILE} | {layer_file(l) for l in range(moe_layer_count(manifest))}
        missing = expected - set(manifest["files"])
        if missing:
            raise CheckpointError(f"{MANIFEST} in {path} lists no record for {sorted(missing)}")
        for name, entry in manifest["files"].items():
            verify_file(path, name, entry, checksum=verify == "full")
    return manifest, qcfg


def check_directory(path) -> tuple[dict, list[str]]:
    """(manifest, problems) of a quantized directory, every file checked against its record: size,
    tensors and a fresh sha256 (the verified stamps are not trusted here: bit rot keeps the mtime).
    Each problem names its file; an empty list means the directory matches its manifest. Raises
    CheckpointError when ``path`` is not a quantized directory at all."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{MANIFEST}: the quantization did not finish")
    expected = [TRUNK_FILE] + [layer_file(l) for l in range(moe_layer_count(manifest))]
    files = manifest["files"]
    for name in expected:
        if name not in files and manifest.get("complete"):
            problems.append(f"{name}: {MANIFEST} holds no record of it")
    for name, entry in files.items():
        try:
            verify_file(path, name, entry)
            if sha256_file(path / name) != entry["sha256"]:
                record_verified(path, name, None)       # so loading and quantize check it again
                raise CheckpointError(f"{name}: sha256 does not match {MANIFEST} (the file is corrupt or was changed)")
            record_verified(path, name, entry["sha256"])
        except CheckpointError as e:
            problems.append(str(e))
        except (KeyError, TypeError, AttributeError):
            problems.append(f"{name}: its record in {MANIFEST} is malformed (no size, sha256 or tensors)")
    return manifest, problems


def model_config(manifest: dict):
    """The original model's transformers config (its family's config class)."""
    from ..adapters import adapter_for
    return adapter_for(manifest.get("model_type", "mixtral")).config_class().from_dict(manifest["config"])


def moe_layer_count(manifest: dict) -> int:
    """MoE layers: one layer_NNN file each (dense layers are trunk)."""
    from ..adapters import adapter_for
    config = model_config(manifest)
    return adapter_for(config).num_layers(config)


def num_experts(manifest: dict) -> int:
    from ..adapters import adapter_for
    config = model_config(manifest)
    return adapter_for(config).num_experts(config)


def expert_format_for(manifest: dict, dtype: torch.dtype = torch.float16, act=None):
    """The ExpertFormat these buffers were written with; raises if our layout differs."""
    from ..quant.format import expert_format
    qcfg = QuantConfig.from_dict(manifest["scheme"])
    dense_dtype = _DTYPES[manifest["expert_dtype"]]
    fmt = expert_format(model_config(manifest), qcfg, dense_dtype if qcfg.expert_bits == 16 else dtype, act)
    ours = [[s.name, list(s.shape), dtype_name(s.dtype), s.offset] for s in fmt.layout.specs]
    if ours != manifest["expert_layout"]:
        raise CheckpointError(f"the expert buffers' layout in {MANIFEST} does not match this moe_colab's "
                              f"layout for {qcfg.name!r}; quantize the checkpoint again")
    return fmt


def load_layer_experts(path, manifest: dict, layer: int, *, verify: bool = True) -> torch.Tensor:
    """uint8 [num_experts, nbytes]: every expert buffer of one layer (checked against its sha256)."""
    from safetensors.torch import load_file
    name = layer_file(layer)
    if name not in manifest["files"]:
        raise CheckpointError(f"{MANIFEST} has no record of {name}")
    if verify:
        check_sha256(path, name, manifest["files"][name])
    buf = load_file(str(Path(path) / name))["experts"]
    want = (num_experts(manifest), manifest["expert_nbytes"])
    if tuple(buf.shape) != want or buf.dtype != torch.uint8:
        raise CheckpointError(f"{name}: tensor 'experts' is {list(buf.shape)} {buf.dtype}, expected "
                              f"{list(want)} uint8")
    return buf


def iter_quantized_experts(path, manifest: dict):
    """Yield (layer, expert, uint8 [nbytes]) for every expert, one layer file in memory at a time."""
    for layer in range(moe_layer_count(manifest)):
        buf = load_layer_experts(path, manifest, layer)
        for expert in range(buf.shape[0]):
            yield layer, expert, buf[expert]


def load_trunk_state_dict(path, manifest: dict, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Non-expert tensors under transformers-5 names; attention projections as QuantLinear
    buffers when attention is quantized (install them with format.attach_quant_linears_)."""
    from safetensors.torch import load_file
    if TRUNK_FILE not in manifest["files"]:
        raise CheckpointError(f"{MANIFEST} has no record of {TRUNK_FILE}")
    if verify:
        check_sha256(path, TRUNK_FILE, manifest["files"][TRUNK_FILE])
    return load_file(str(Path(path) / TRUNK_FILE))
