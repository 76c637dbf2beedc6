"""Reading Hugging Face checkpoints lazily, shard by shard, and validating them first.

Accepted layouts (a local directory, or a Hub id downloaded through huggingface_hub):

    config.json + model.safetensors
    config.json + model.safetensors.index.json + the shards it lists

Every shard's safetensors header is checked before anything large is allocated, so a missing,
truncated or corrupt shard is reported by name instead of as a crash half-way through loading.
Tensors are then read one at a time with ``safe_open`` (memory-mapped), so host memory never
holds a second full copy of the weights.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Models shipped inside the package, by name.
BUILTIN_MODELS = {"tiny": Path(__file__).parent / "tiny" / "weights"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file."""


def builtin_model_path(name: str) -> Path | None:
    """Path of a model shipped inside the package (``"tiny"``), else None."""
    p = BUILTIN_MODELS.get(name)
    return p if p is not None and (p / "config.json").is_file() else None


def resolve(path_or_id: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local directory for a path, a built-in name (``"tiny"``) or a Hub id."""
    s = str(path_or_id)
    # A bare built-in name ("tiny") wins over a folder of that name in the current directory;
    # "./tiny" means the folder.
    builtin = builtin_model_path(s) if s and "/" not in s and os.sep not in s else None
    if builtin is not None:
        return builtin
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    from .config import HUB_ALIASES
    s = HUB_ALIASES.get(s, s)
    looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not p.exists()
    if looks_like_hub_id and allow_download:
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(
                s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
        except Exception as e:  # offline, unknown repo, gated repo: say which
            raise FileNotFoundError(f"could not find {s!r} locally or download it from the Hub: {e}") from e
    raise FileNotFoundError(f"model path does not exist: {s!r} (not a directory, not a built-in model, "
                            f"not a Hub id)")


def read_config_dict(directory: Path) -> dict:
    cfg = directory / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e


def _safetensors_header(path: Path) -> dict:
    """Parse and check one shard's header; raise CheckpointError naming the file if it is bad."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {path.name} is truncated ({size} bytes): no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"shard {path.name} is truncated or corrupt: header says {n} bytes, "
                                  f"file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"shard {path.name} has a corrupt header: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"shard {path.name} is truncated: its header needs {8 + n + end} bytes, "
                              f"the file has {size}")
    return header


def shard_map(directory: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} for a checkpoint, every shard validated."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
    elif (directory / SINGLE_FILE).is_file():
        shards = {SINGLE_FILE: None}
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    for shard in list(shards):
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"shard {shard} is listed in {INDEX_FILE} but missing from {directory}")
        header = _safetensors_header(path)
        names = [k for k in header if k != "__metadata__"]
        listed = shards[shard]
        if listed is None:
            shards[shard] = names
        else:
            absent = set(listed) - set(names)
            if absent:
                raise CheckpointError(f"shard {shard} lacks tensors its index lists, e.g. {sorted(absent)[:3]}")
    return shards


def iter_tensors(directory: Path, shards: dict[str, list[str]], *, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard; only one tensor is materialised at a time."""
    from safetensors import safe_open

    for shard, names in shards.items():
        with safe_open(str(directory / shard), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
                if progress is not None:
                    progress.update(1)
