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
import re
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
    if p.exists():
        hint = (f"; pass the directory that holds it: {str(p.parent)!r}"
                if p.name in ("config.json", SINGLE_FILE, INDEX_FILE) or p.suffix == ".safetensors" else "")
        raise CheckpointError(f"model path {s!r} is a file, not a directory: a checkpoint is a directory holding "
                              f"config.json and model.safetensors (or an index and its shards){hint}")
    raise FileNotFoundError(f"model path does not exist: {s!r} (not a directory, not a built-in model, "
                            f"not a Hub id)")


def read_config_dict(directory: Path) -> dict:
    cfg = directory / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg} holds a JSON {type(config).__name__}, not an object of settings "
                              f"{{\"model_type\": ..., ...}}")
    return config


def read_json_file(path: Path, what: str) -> dict:
    """A small JSON settings file (generation_config.json, ...), or CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} ({what}) holds a JSON {type(value).__name__}, not an object")
    return value


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
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"shard {path.name} has a corrupt header (not a safetensors tensor table)") from e
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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: "
                                  f"{'no weight_map' if isinstance(e, (KeyError, TypeError)) else e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: its weight_map is not "
                                  f"{{tensor name: shard file}}")
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


def check_tensors(directory: Path, shards: dict[str, list[str]], adapter, config,
                  trunk: dict[str, tuple[int, ...]] | None = None, tied: frozenset[str] = frozenset()) -> None:
    """Every tensor's name and shape, read from the shard headers, against the config: before
    anything large is allocated (a Mixtral-8x7B config over small tensors would otherwise
    allocate tens of GB of expert buffers first). Raises CheckpointError naming the shard, the
    tensor (layer and expert), what the config needs and what the file holds.

    trunk: {parameter name: shape} of every non-expert tensor the model needs (transformers
    names); tied: names the model ties to another parameter (lm_head.weight when
    tie_word_embeddings): they may be absent from the file."""
    layers, experts = adapter.num_layers(config), adapter.num_experts(config)
    want = adapter.expert_shapes(config)
    moe = adapter.moe_layers(config)
    reader = adapter.expert_reader(config)       # per-expert, fused or MXFP4 layouts (adapters/base.py)
    seen_experts, seen_trunk = set(), set()
    for shard, names in shards.items():
        header = _safetensors_header(directory / shard)
        for name in names:
            shape = tuple(header[name]["shape"])
            where = f"{shard}: {name}"
            m = re.match(r"^model\.layers\.(\d+)\.", name)
            if m and int(m[1]) >= config.num_hidden_layers and reader.trunk_name(name) is not None:
                raise CheckpointError(f"{where} belongs to layer {m[1]}, but config.json has "
                                      f"{config.num_hidden_layers} layers (num_hidden_layers): the checkpoint and "
                                      f"its config disagree")
            try:
                keys = reader.expect(name, shape)
            except ValueError as e:
                raise CheckpointError(f"{where} {e}: the checkpoint and its config disagree") from None
            if keys is not None:
                seen_experts.update(keys)
            elif trunk is not None:
                param = reader.trunk_name(name)
                if param is None:                # transformers ignores it too
                    continue
                if param in tied:
                    continue
                if param not in trunk:
                    raise CheckpointError(f"{where} fits no parameter of a {config.model_type} model with this "
                                          f"config.json")
                if shape != tuple(trunk[param]):
                    raise CheckpointError(f"{where} has shape {list(shape)}, config.json needs "
                                          f"{list(trunk[param])}: the checkpoint and its config disagree")
                seen_trunk.add(param)
    missing = [adapter.expert_key(moe[l], e, w) for l in range(layers) for e in range(experts) for w in want
               if (l, e, w) not in seen_experts]
    if trunk is not None:
        missing += [p for p in trunk if p not in seen_trunk]
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) its config.json needs, "
                              f"e.g. {missing[:3]}")


def iter_tensors(directory: Path, shards: dict[str, list[str]], *, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard; only one tensor is materialised at a time."""
    from safetensors import safe_open

    for shard, names in shards.items():
        with safe_open(str(directory / shard), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
                if progress is not None:
                    progress.update(1)
