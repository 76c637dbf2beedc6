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


def test_every_load_is_checked_against_the_plan(checkpoints, tmp_path, monkeypatch):
    """A fixed experts_on_device is checked against the device and host budgets (set here through
    the documented environment variables) before anything is allocated, and refused with the
    plan's numbers and what would fit; "auto", the default, plans for the same budgets."""
    import psutil

    from moe_colab.planner import PlanError
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **MODEL_PRESETS["mixtral-8x7b"]}
    big = tmp_path / "mixtral-shaped"            # Mixtral-8x7B's config: 16-bit experts need ~87 GB
    big.mkdir()
    (big / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.ones(4096)}, str(big / "model.safetensors"))
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", "12.7GB")
    before = psutil.Process().memory_info().rss
    with pytest.raises(PlanError) as err:
        load(big, experts_on_device=4)
    msg = str(err.value)
    assert "budget" in msg and "GiB" in msg and "what would fit instead" in msg
    assert psutil.Process().memory_info().rss - before < 200 * 2**20, "something large was allocated"
    with pytest.raises(PlanError):
        load(big)                                # "auto": nothing fits either
    # "auto" plans what plan() plans for the same machine.
    small = checkpoints["L2-E4-k2-gqa2-sharded"]
    monkeypatch.delenv("MOE_COLAB_HOST_BYTES")
    roomy = moe_colab.plan(small, device="cpu", dtype=torch.float32, host_bytes=2**40, max_context=64)
    auto = load(small, max_context=64)
    assert auto.offload_options.experts_on_device == roomy.experts_on_device == 4


def test_the_default_is_auto(checkpoints):
    model = load(checkpoints["L1-E8-k2-mqa"], prefetch=0)
    assert model.offload_options.experts_on_device == 8 and not model.offload_options.swap
