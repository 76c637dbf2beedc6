"""Getting Mixtral onto a Colab: quantize from the Hub shard by shard, or download a quantized one.

A free Colab has ~12.7 GB of RAM and ~100 GB of disk; Mixtral-8x7B's original checkpoint is
~93 GB in 19 shards. ``quantize_from_hub`` therefore works one shard at a time:

    for each shard:  download it (scratch disk) -> quantize its tensors -> save the finished
                     units to ``dst`` (e.g. Google Drive) -> delete the shard

so disk holds one shard and RAM about one shard's trunk tensors plus the one or two layers of
experts that straddle shards. Progress survives a disconnect: finished layers are ordinary units
of the quantized directory (manifest.py), half-finished layers and each shard's trunk tensors are
saved under ``dst/parts``, and ``dst/moe_colab_hub.json`` lists the shards done. Rerunning
downloads only the shards not done. The result is exactly what ``moe_colab.quantize`` writes
(same manifest, same units), so ``moe_colab.load_model(dst)`` reads it.

    dst = quantize_from_hub("mistralai/Mixtral-8x7B-Instruct-v0.1", "/content/drive/MyDrive/mixtral-2bit")
    model = moe_colab.load_model(dst, experts_on_device="auto")

``download_quantized(repo_id)`` fetches a directory that someone already quantized and uploaded
(our format: manifest + units); ``moe_colab.convert.authors`` reads the paper authors' own.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 4 (the Colab demo).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..adapters.mixtral import MixtralAdapter as A
from ..checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, _safetensors_header

STATE = "moe_colab_hub.json"
PARTS = "parts"
SMALL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json")


class HubShards:
    """The original checkpoint as shards: the names, a fetch per shard, its tensors, deletion."""

    def __init__(self, fetch: Callable[[str], os.PathLike], identity: str):
        self.fetch_file, self.identity = fetch, identity
        self.config = json.loads(Path(fetch("config.json")).read_text())
        try:
            index = json.loads(Path(fetch(INDEX_FILE)).read_text())["weight_map"]
        except (FileNotFoundError, OSError, KeyError, ValueError) + _hub_missing():
            index = None
        self.names: dict[str, list[str] | None] = {}
        if index is None:
            self.names[SINGLE_FILE] = None
        else:
            for tensor, shard in index.items():
                self.names.setdefault(shard, []).append(tensor)

    @property
    def shards(self) -> list[str]:
        return sorted(self.names)

    def fetch(self, shard: str) -> Path:
        return Path(self.fetch_file(shard))

    def tensors(self, shard: str, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor), one at a time; the header is checked first (names the file)."""
        from safetensors import safe_open
        header = _safetensors_header(path)
        names = self.names[shard] or [k for k in header if k != "__metadata__"]
        absent = set(names) - set(header)
        if absent:
            raise CheckpointError(f"shard {shard} lacks tensors its index lists, e.g. {sorted(absent)[:3]}")
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)

    def release(self, shard: str, path: Path) -> None:
        """Delete the downloaded shard (and its cache blob, if it was a symlink)."""
        path = Path(path)
        target = path.resolve()
        path.unlink(missing_ok=True)
        if target != path:
            target.unlink(missing_ok=True)

    def small_files(self) -> dict[str, Path]:
        out = {"config.json": Path(self.fetch_file("config.json"))}
        for name in SMALL_FILES:
            try:
                out[name] = Path(self.fetch_file(name))
            except (FileNotFoundError, OSError) + _hub_missing():
                pass
        return out


def _hub_missing() -> tuple:
    try:
        from huggingface_hub.errors import EntryNotFoundError
        return (EntryNotFoundError,)
    except ImportError:
        return ()


def hub_fetcher(repo_id: str, scratch, *, revision: str | None = None, token=None):
    """fetch(filename) -> local path, downloading into ``scratch`` with huggingface_hub."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, revision=revision, local_dir=str(scratch), token=token)
    return fetch


def quantize_from_hub(repo_id: str, dst, quant="paper-2bit", *, revision: str | None = None, scratch=None,
                      fetch=None, device=None, dtype: torch.dtype = torch.float16, progress: bool = True,
                      on_shard_done=None) -> Path:
    """Quantize a Hub checkpoint into ``dst`` one shard at a time (resumable; see the module doc).

    scratch: where one shard is downloaded (default: a temporary directory; on Colab use local
    disk, not Drive). fetch(filename) -> path replaces the download (tests, mirrors).
    on_shard_done(shard) is called after each shard is safely recorded. Returns dst.
    """
    from ..config import HUB_ALIASES
    repo_id = HUB_ALIASES.get(repo_id, repo_id)
    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="moe_colab_shard_"))
    fetch = fetch or hub_fetcher(repo_id, scratch, revision=revision)
    source = HubShards(fetch, identity=f"{repo_id}@{revision or 'main'}")
    return quantize_shards(source, dst, quant, device=device, dtype=dtype, progress=progress,
                           on_shard_done=on_shard_done)


# -- the resumable, shard-by-shard writer ------------------------------------------------------
def quantize_shards(source, dst, quant, *, device=None, dtype=torch.float16, progress=True,
                    on_shard_done=None) -> Path:
    """Write ``source`` (HubShards, or any object with config, identity, shards, fetch, tensors,
    release, small_files) into a quantized directory, shard by shard."""
    from tqdm.auto import tqdm

    from ..quant.config import resolve_quant
    from ..quant.format import expert_format
    from .manifest import TRUNK_FILE, layer_file
    from ..quant.matrix import default_device
    from .quantize import _start_or_resume

    qcfg = resolve_quant(quant)
    if qcfg is None or qcfg.is_noop:
        raise ValueError("quant selects no quantization; there is nothing to write")
    if source.config.get("model_type") != A.model_type:
        raise CheckpointError(f"{source.identity}: model_type {source.config.get('model_type')!r}; only "
                              f"'{A.model_type}' checkpoints can be quantized")
    config = A.config_class().from_dict(source.config)
    qcfg.validate_for(config)
    dst, device = Path(dst), torch.device(device or default_device())
    fmt = expert_format(config, qcfg, dtype)
    E, L = A.num_experts(config), A.num_layers(config)
    manifest = _start_or_resume(dst, fresh_manifest(config, qcfg, dtype, fmt, source.identity), True)
    state = _read_state(dst, source.identity)
    (dst / PARTS).mkdir(exist_ok=True)

    def needed(shard) -> bool:
        names = getattr(source, "names", {}).get(shard)
        if shard in state["done"]:
            return False
        if not names:
            return True
        layers = {k[0] for k in map(A.parse_expert_key, names) if k is not None}
        trunk = any(A.parse_expert_key(n) is None for n in names)
        return (trunk and TRUNK_FILE not in manifest["files"]) or any(
            layer_file(l) not in manifest["files"] for l in layers)

    for shard in tqdm(source.shards, desc=f"quantize {qcfg.name}", unit="shard", disable=not progress):
        if not needed(shard):
            continue
        path = source.fetch(shard)
        try:
            _quantize_shard(source, shard, path, dst, manifest, qcfg, fmt, E, device)
        finally:
            source.release(shard, path)
        state["done"].append(shard)
        _write_json(dst / STATE, state)
        if on_shard_done:
            on_shard_done(shard)

    if TRUNK_FILE not in manifest["files"]:
        from safetensors.torch import load_file

        from .quantize import _save_unit
        trunk = {}
        for part in sorted((dst / PARTS).glob("trunk.*.safetensors")):
            trunk.update(load_file(str(part)))
        if trunk:
            _save_unit(dst, TRUNK_FILE, trunk, manifest)
    missing = [n for n in [TRUNK_FILE] + [layer_file(l) for l in range(L)] if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{source.identity} lacks tensors for {missing[:4]} (e.g. some experts of those "
                              f"layers): every shard was read and these units are still incomplete")
    from .manifest import write_manifest
    manifest["complete"] = True
    write_manifest(dst, manifest)
    shutil.rmtree(dst / PARTS, ignore_errors=True)
    for name, path in source.small_files().items():
        shutil.copyfile(path, dst / name)
    return dst


def fresh_manifest(config, qcfg, dtype, fmt, source: str) -> dict:
    """The manifest moe_colab.quantize starts from (same fields, so either can resume the other)."""
    from .manifest import FORMAT, FORMAT_VERSION, dtype_name
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": A.model_type,
         "scheme_name": qcfg.name, "scheme": qcfg.to_dict(), "config": config.to_dict(),
         "source": source, "expert_dtype": dtype_name(dtype), "expert_nbytes": fmt.layout.nbytes,
         "expert_layout": [[s.name, list(s.shape), dtype_name(s.dtype), s.offset] for s in fmt.layout.specs],
         "files": {}, "complete": False}
    return json.loads(json.dumps(m))


def _quantize_shard(source, shard, path, dst, manifest, qcfg, fmt, E, device) -> None:
    """Quantize one shard's tensors; save its trunk part and every layer it touched."""
    from .manifest import TRUNK_FILE, layer_file
    from .quantize import _save_unit, quantize_trunk_tensor

    trunk, layers = {}, {}
    for name, t in source.tensors(shard, path):
        key = A.parse_expert_key(name)
        if A.is_fused_expert_key(name):
            raise CheckpointError(f"{shard}: fused expert tensor {name!r} is not supported")
        if key is None:
            if TRUNK_FILE in manifest["files"]:
                continue
            trunk.update(quantize_trunk_tensor(name, t, qcfg, device))
            continue
        layer, expert, w = key
        if layer_file(layer) in manifest["files"]:
            continue
        if layer not in layers:
            layers[layer] = _load_partial(dst, layer, E, fmt.layout.nbytes)
        buf, written = layers[layer]
        fmt.write(fmt.layout.views(buf[expert]), w, t.to(device))
        written[expert, "w1 w2 w3".split().index(w)] = 1
    if trunk:
        _save_part(dst / PARTS / f"trunk.{Path(shard).stem}.safetensors", trunk)
    for layer, (buf, written) in sorted(layers.items()):
        partial = dst / PARTS / f"{layer_file(layer)}.partial"
        if bool(written.all()):
            _save_unit(dst, layer_file(layer), {"experts": buf}, manifest)
            partial.unlink(missing_ok=True)
        else:
            _save_part(partial, {"experts": buf, "written": written})


def _load_partial(dst: Path, layer: int, E: int, nbytes: int):
    """(uint8 [E, nbytes] buffers, uint8 [E, 3] which of w1/w2/w3 are in) of a half-done layer."""
    from safetensors.torch import load_file

    from .manifest import layer_file
    partial = dst / PARTS / f"{layer_file(layer)}.partial"
    if partial.is_file():
        try:
            t = load_file(str(partial))
            if tuple(t["experts"].shape) == (E, nbytes) and tuple(t["written"].shape) == (E, 3):
                return t["experts"], t["written"]
        except Exception:   # a part cut short by a disconnect: start the layer again
            pass
    return torch.zeros(E, nbytes, dtype=torch.uint8), torch.zeros(E, 3, dtype=torch.uint8)


def _save_part(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _read_state(dst: Path, identity: str) -> dict:
    f = dst / STATE
    if not f.is_file():
        return {"source": identity, "done": []}
    state = json.loads(f.read_text())
    if state.get("source") != identity:
        raise ValueError(f"{dst} holds a quantization of {state.get('source')!r}, not {identity!r}; "
                         f"choose an empty directory")
    return state


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# -- a quantized directory that is already on the Hub -------------------------------------------
def download_quantized(repo_id: str, local_dir=None, *, revision: str | None = None, snapshot_download=None) -> Path:
    """Download a directory written by moe_colab.quantize (manifest + units + tokenizer files)
    and check it is one; returns the local path for moe_colab.load_model."""
    from .manifest import MANIFEST, open_quantized
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    path = Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir,
                                  allow_patterns=[MANIFEST, "*.safetensors", "*.json", "tokenizer*", "*.model"]))
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{repo_id} has no {MANIFEST}: it is not a moe_colab quantized directory "
                              f"(an original checkpoint loads with moe_colab.load_model({repo_id!r}, quant=...))")
    open_quantized(path)          # complete, and every unit matches the manifest
    return path


def load_from_hub(repo_id: str, *, revision: str | None = None, local_dir=None, snapshot_download=None, **load_kwargs):
    """moe_colab.load_model on a quantized directory downloaded from the Hub."""
    from ..model import load_model
    return load_model(download_quantized(repo_id, local_dir, revision=revision,
                                         snapshot_download=snapshot_download), **load_kwargs)
