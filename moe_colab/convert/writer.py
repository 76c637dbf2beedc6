"""QuantizedDirWriter: the one writer of quantized directories (manifest.py says what they hold).

Both ways of quantizing (quantize.py: a local checkpoint, trunk first then layer by layer; or
shard by shard from the Hub or the authors' layout) write through this class, so there is one
manifest schema and one set of rules:

    units       trunk.safetensors and layer_NNN.safetensors; each is written to a temporary
                file, renamed, and recorded (size, sha256, tensors) in the manifest, which is
                itself replaced atomically: an interruption loses at most the unit in progress
    parts/      what a shard-by-shard run keeps between shards: each shard's trunk tensors and
                half-filled layers (uint8 experts + which matrices are in), deleted at the end
    identity    the manifest records what it was made from (the source's id, the sha256 of its
                config, its shard names and sizes): a directory made from another source, with
                another scheme or other settings is refused, never mixed
    nothing on disk before the first unit is ready: a run that fails at its start leaves no
    directory behind (only a run that did some work can be resumed)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .manifest import (FORMAT, FORMAT_VERSION, MANIFEST, TRUNK_FILE, dtype_name, file_entry, layer_file,
                       read_manifest, verify_file, write_manifest)

PARTS = "parts"
STATE = "moe_colab_hub.json"        # shard-by-shard runs: the shards already done
IDENTITY = ("model_type", "scheme", "config", "expert_layout", "expert_dtype", "source")


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def fresh_manifest(*, model_type: str, config, qcfg, dtype, fmt, source: str, shards: dict | None = None) -> dict:
    """The manifest a run starts from: the one schema of a quantized directory."""
    cfg = config.to_dict()
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
         "scheme_name": qcfg.name, "scheme": qcfg.to_dict(), "config": cfg,
         "source": source, "source_config_sha256": config_sha256(cfg),
         "source_shards": dict(sorted((shards or {}).items())),
         "expert_dtype": dtype_name(dtype), "expert_nbytes": fmt.layout.nbytes,
         "expert_layout": [[s.name, list(s.shape), dtype_name(s.dtype), s.offset] for s in fmt.layout.specs],
         "files": {}, "complete": False}
    return json.loads(json.dumps(m))        # exactly as it reads back from disk


class QuantizedDirWriter:
    def __init__(self, dst, fresh: dict, *, verify_existing: bool = True):
        self.dst = Path(dst)
        if self.dst.exists() and not self.dst.is_dir():
            raise CheckpointError(f"{self.dst} is a file, not a directory: choose a directory for the output")
        _check_writable(self.dst)
        self.manifest = self._resume(fresh, verify_existing) if (self.dst / MANIFEST).is_file() else fresh
        self.started = (self.dst / MANIFEST).is_file()

    # -- starting or resuming ------------------------------------------------------------------
    def _resume(self, fresh: dict, verify: bool) -> dict:
        old = read_manifest(self.dst)
        for key in IDENTITY:
            if old.get(key) != fresh[key]:
                what = {"source": f"from {old.get('source')!r}, not {fresh['source']!r}",
                        "scheme": f"with {old.get('scheme_name')!r}, not {fresh['scheme_name']!r}"
                        }.get(key, f"with another {key.replace('_', ' ')}")
                raise ValueError(f"{self.dst} already holds a different quantization (made {what}); choose an "
                                 f"empty directory or delete it")
        for key in ("source_config_sha256", "source_shards"):
            if key in old and old[key] != fresh[key]:
                raise ValueError(f"{self.dst} already holds a different quantization: {fresh['source']!r} has "
                                 f"changed since it was started ({key.replace('_', ' ')} differ); choose an empty "
                                 f"directory or delete it")
        finished = old.get("complete", False)
        for name, entry in list(old["files"].items()):
            try:    # hashes only what changed since its last check (the verified stamps)
                verify_file(self.dst, name, entry, checksum=verify)
            except CheckpointError as e:
                warnings.warn(f"redoing {name}: {e}")
                del old["files"][name]
        if not finished or len(old["files"]) != len(fresh_files(old)):
            old["complete"] = False
        write_manifest(self.dst, old)
        return old

    def _start(self) -> None:
        """Create the directory and its manifest: only once there is something to write."""
        if not self.started:
            self.dst.mkdir(parents=True, exist_ok=True)
            write_manifest(self.dst, self.manifest)
            self.started = True

    # -- units ---------------------------------------------------------------------------------
    def has(self, unit: str) -> bool:
        return unit in self.manifest["files"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def save_unit(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        self._start()
        tmp = self.dst / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.dst / name)
        self.manifest["files"][name] = file_entry(self.dst / name, tensors)
        write_manifest(self.dst, self.manifest)

    # -- parts kept between shards -------------------------------------------------------------
    def load_partial(self, layer: int, num_experts: int, nbytes: int, matrices: int = 3):
        """(uint8 [E, nbytes] buffers, uint8 [E, matrices]: which are in) of a half-done layer."""
        from safetensors.torch import load_file
        partial = self.dst / PARTS / f"{layer_file(layer)}.partial"
        if partial.is_file():
            try:
                t = load_file(str(partial))
                if tuple(t["experts"].shape) == (num_experts, nbytes) and \
                        tuple(t["written"].shape) == (num_experts, matrices):
                    return t["experts"], t["written"]
            except Exception:   # a part cut short by a disconnect: start the layer again
                pass
        return (torch.zeros(num_experts, nbytes, dtype=torch.uint8),
                torch.zeros(num_experts, matrices, dtype=torch.uint8))

    def save_layer(self, layer: int, buf: torch.Tensor, written: torch.Tensor) -> None:
        """A layer's experts: the unit when every matrix is in, else a part for later shards."""
        partial = self.dst / PARTS / f"{layer_file(layer)}.partial"
        if bool(written.all()):
            self.save_unit(layer_file(layer), {"experts": buf})
            partial.unlink(missing_ok=True)
        else:
            self._save_part(partial, {"experts": buf, "written": written})

    def save_trunk_part(self, shard: str, tensors: dict) -> None:
        self._save_part(self.dst / PARTS / f"trunk.{Path(shard).stem}.safetensors", tensors)

    def trunk_from_parts(self) -> None:
        """The trunk unit from every shard's trunk part (once all shards are done)."""
        from safetensors.torch import load_file
        if self.has(TRUNK_FILE):
            return
        trunk = {}
        for part in sorted((self.dst / PARTS).glob("trunk.*.safetensors")):
            trunk.update(load_file(str(part)))
        if trunk:
            self.save_unit(TRUNK_FILE, trunk)

    def _save_part(self, path: Path, tensors: dict) -> None:
        from safetensors.torch import save_file
        self._start()
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    # -- shards done (shard-by-shard runs) -----------------------------------------------------
    def shards_done(self) -> list[str]:
        f = self.dst / STATE
        if not f.is_file():
            return []
        state = json.loads(f.read_text())
        if state.get("source") != self.manifest["source"]:
            raise ValueError(f"{self.dst} holds a quantization of {state.get('source')!r}, not "
                             f"{self.manifest['source']!r}; choose an empty directory")
        return list(state.get("done", []))

    def mark_shard_done(self, shard: str) -> None:
        self._start()
        done = self.shards_done() + [shard]
        tmp = self.dst / (STATE + ".tmp")
        tmp.write_text(json.dumps({"source": self.manifest["source"], "done": done}, indent=1))
        os.replace(tmp, self.dst / STATE)

    # -- the end -------------------------------------------------------------------------------
    def finish(self, small_files: dict[str, Path] | None = None) -> Path:
        """Check every unit is there, mark the manifest complete, drop the parts, copy the small
        files (config, tokenizer). Raises CheckpointError naming what is missing."""
        missing = [n for n in fresh_files(self.manifest) if not self.has(n)]
        if missing:
            raise CheckpointError(f"{self.manifest['source']} lacks tensors for {missing[:4]} (e.g. some experts "
                                  f"of those layers)")
        self.manifest["complete"] = True
        self._start()
        write_manifest(self.dst, self.manifest)
        shutil.rmtree(self.dst / PARTS, ignore_errors=True)
        for name, path in (small_files or {}).items():
            if Path(path).resolve() != (self.dst / name).resolve():
                shutil.copyfile(path, self.dst / name)
        return self.dst


def _check_writable(dst: Path) -> None:
    """Refuse an output no run could write, before any work (the directory itself is made only
    when the first unit is ready): its nearest existing ancestor must be a writable directory."""
    probe = dst.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CheckpointError(f"cannot write {dst}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {dst}: {probe} is not writable")


def fresh_files(manifest: dict) -> list[str]:
    """Every unit a finished directory holds: the trunk and one file per layer."""
    from .manifest import moe_layer_count
    return [TRUNK_FILE] + [layer_file(l) for l in range(moe_layer_count(manifest))]
