"""Bad input gets a clear error that names the problem, before any large allocation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import moe_colab
from moe_colab.checkpoint import CheckpointError
from moe_colab.config import MODEL_PRESETS


def load(path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("progress", False)
    return moe_colab.load_model(path, **kw)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_not_a_moe_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a supported MoE model.*llama"):
        load(tmp_path)


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_experts_on_device_out_of_range(small_checkpoint, bad):
    with pytest.raises(ValueError, match=f"experts_on_device={bad} is outside 1..4"):
        load(small_checkpoint, experts_on_device=bad)


@pytest.mark.parametrize("bad", [-1, 5])
def test_prefetch_out_of_range(small_checkpoint, bad):
    with pytest.raises(ValueError, match=f"prefetch={bad} is outside 0..4"):
        load(small_checkpoint, prefetch=bad)


def test_cuda_without_cuda(small_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load(small_checkpoint, device="cuda")


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def first_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[0]


def test_shard_listed_but_missing(small_checkpoint, tmp_path):
    ck = copy(small_checkpoint, tmp_path / "ck")
    shard = first_shard(ck)
    (ck / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load(ck)


def test_truncated_shard_named(small_checkpoint, tmp_path):
    ck = copy(small_checkpoint, tmp_path / "ck")
    shard = first_shard(ck)
    data = (ck / shard).read_bytes()
    (ck / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard} is truncated"):
        load(ck)


def test_corrupt_header_named(small_checkpoint, tmp_path):
    ck = copy(small_checkpoint, tmp_path / "ck")
    shard = first_shard(ck)
    (ck / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=shard):
        load(ck)


def test_full_size_config_fails_fast_without_allocating(tmp_path):
    """Mixtral-8x7B's config over a truncated shard: the shard is named before ~90 GB of
    experts would be allocated (the process would die of memory instead)."""
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **MODEL_PRESETS["mixtral-8x7b"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load(tmp_path, experts_on_device=4)
    with pytest.raises(ValueError, match="experts_on_device=9"):
        load(tmp_path, experts_on_device=9)


def test_unsharded_and_builtin_resolution(checkpoints):
    path = checkpoints["L3-E3-k1-mha"]
    assert (path / "model.safetensors").is_file()
    model = load(path, experts_on_device=3, prefetch=0)
    assert model.offload_stats()["hits"] == 0
    assert set(model.offload_stats()) >= {"hits", "misses", "prefetch_hits", "bytes_to_device"}
    assert all(isinstance(v, int) for v in model.offload_stats().values())


def test_builtin_name_wins_over_a_local_folder(tmp_path, monkeypatch):
    from moe_colab.checkpoint import builtin_model_path, resolve
    if builtin_model_path("tiny") is None:
        pytest.skip("the built-in tiny model is not installed")
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny") == builtin_model_path("tiny")
    assert resolve("./tiny").resolve() == (tmp_path / "tiny").resolve()
