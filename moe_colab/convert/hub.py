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
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, _safetensors_header
from .quantize import quantize_shards
from .writer import PARTS, STATE  # noqa: F401  (where a shard-by-shard run keeps its progress)

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
