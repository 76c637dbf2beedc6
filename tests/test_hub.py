"""Getting a checkpoint onto a Colab without a network: the shard-by-shard Hub quantizer (with a
fake download over a local save_pretrained checkpoint) and downloading a quantized directory."""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe_colab
from conftest import write_checkpoint
from moe_colab.checkpoint import CheckpointError
from moe_colab.convert.hub import STATE, download_quantized, load_from_hub, quantize_from_hub
from moe_colab.convert.manifest import MANIFEST

QUANT = "paper-2bit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # Small shards, so that layers' experts straddle shard boundaries.
    return write_checkpoint(tmp_path_factory.mktemp("hub") / "ck", layers=3, experts=4, top_k=2, heads=4,
                            kv_heads=2, hidden=64, intermediate=128, vocab=128, shard_size="400KB", seed=5,
                            tokenizer=True)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """moe_colab.quantize on the whole local checkpoint: what the Hub path must reproduce."""
    return moe_colab.quantize(ckpt, tmp_path_factory.mktemp("ref") / "q", QUANT, device="cpu", progress=False)


def shards_of(ckpt) -> list[str]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


class FakeHub:
    """fetch(filename) -> a copy in scratch, like hf_hub_download(local_dir=scratch); records what
    was downloaded and how many shards sat on the scratch disk at each download."""

    def __init__(self, src: Path, scratch: Path, fail_on: str | None = None, truncate: str | None = None):
        self.src, self.scratch, self.fail_on, self.truncate = src, scratch, fail_on, truncate
        self.fetched, self.on_disk = [], []
        scratch.mkdir(parents=True, exist_ok=True)

    def __call__(self, filename: str) -> str:
        if not (self.src / filename).is_file():
            raise FileNotFoundError(filename)
        if filename == self.fail_on:
            raise ConnectionError(f"simulated disconnect while downloading {filename}")
        dst = self.scratch / filename
        shutil.copyfile(self.src / filename, dst)
        if filename == self.truncate:
            dst.write_bytes(dst.read_bytes()[:-64])
        if filename.endswith(".safetensors"):
            self.fetched.append(filename)
            self.on_disk.append(len(list(self.scratch.glob("*.safetensors"))))
        return str(dst)


def assert_same_quantization(a: Path, b: Path):
    ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (a, b))
    for key in ("scheme", "config", "expert_layout", "expert_dtype", "expert_nbytes", "complete"):
        assert ma[key] == mb[key], key
    assert set(ma["files"]) == set(mb["files"])
    for name in ma["files"]:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert set(ta) == set(tb), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)


def greedy(model, n=12):
    ids = torch.tensor([[3, 17, 42, 9, 100, 5]])
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def load(path):
    return moe_colab.load_model(path, device="cpu", dtype=torch.float32, experts_on_device=2, prefetch=1,
                                progress=False)


def test_shard_by_shard_equals_quantize(ckpt, reference, tmp_path):
    hub = FakeHub(ckpt, tmp_path / "scratch")
    done = []
    dst = quantize_from_hub("someone/mixtral", tmp_path / "drive" / "q", QUANT, fetch=hub, device="cpu",
                            progress=False, on_shard_done=done.append)
    shards = shards_of(ckpt)
    assert len(shards) >= 3 and hub.fetched == shards == done
    assert max(hub.on_disk) == 1, "more than one shard on the scratch disk at a time"
    assert not list((tmp_path / "scratch").glob("*.safetensors")), "shards left behind"
    assert_same_quantization(dst, reference)
    assert (dst / "tokenizer.json").is_file() and (dst / "config.json").is_file()
    assert not (dst / "parts").exists()
    assert torch.equal(greedy(load(dst)), greedy(load(reference)))
    # Running it again on a finished directory downloads nothing.
    again = FakeHub(ckpt, tmp_path / "scratch2")
    quantize_from_hub("someone/mixtral", dst, QUANT, fetch=again, device="cpu", progress=False)
    assert again.fetched == []


def test_a_disconnect_resumes_without_redoing_finished_shards(ckpt, reference, tmp_path):
    shards = shards_of(ckpt)
    dst = tmp_path / "drive" / "q"
    first = FakeHub(ckpt, tmp_path / "scratch", fail_on=shards[2])
    with pytest.raises(ConnectionError, match="simulated disconnect"):
        quantize_from_hub("someone/mixtral", dst, QUANT, fetch=first, device="cpu", progress=False)
    state = json.loads((dst / STATE).read_text())
    assert state["done"] == shards[:2]
    units = json.loads((dst / MANIFEST).read_text())["files"]
    stamps = {n: (dst / n).stat().st_mtime_ns for n in units}
    assert any(n.startswith("layer_") for n in units), "no layer finished in the first two shards"
    assert list((dst / "parts").iterdir()), "the first shards' trunk tensors were not kept"

    second = FakeHub(ckpt, tmp_path / "scratch")
    quantize_from_hub("someone/mixtral", dst, QUANT, fetch=second, device="cpu", progress=False)
    assert second.fetched == shards[2:]
    for name, stamp in stamps.items():
        assert (dst / name).stat().st_mtime_ns == stamp, f"{name} was written again"
    assert_same_quantization(dst, reference)


def test_an_interrupt_inside_a_shard_redoes_only_that_shard(ckpt, reference, tmp_path, monkeypatch):
    """A KeyboardInterrupt while a shard is being quantized: that shard is downloaded again, the
    half-written layer buffers on disk are consistent, and the result is still exact."""
    import moe_colab.convert.quantize as hub_module      # the shard-by-shard driver lives there
    shards = shards_of(ckpt)
    calls = {"n": 0}
    real = hub_module._quantize_shard

    def interrupted(source, shard, *args):
        calls["n"] += 1
        if shard == shards[1] and calls["n"] == 2:
            raise KeyboardInterrupt
        return real(source, shard, *args)

    monkeypatch.setattr(hub_module, "_quantize_shard", interrupted)
    dst = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize_from_hub("someone/mixtral", dst, QUANT, fetch=FakeHub(ckpt, tmp_path / "s1"), device="cpu",
                          progress=False)
    monkeypatch.setattr(hub_module, "_quantize_shard", real)
    resumed = FakeHub(ckpt, tmp_path / "s2")
    quantize_from_hub("someone/mixtral", dst, QUANT, fetch=resumed, device="cpu", progress=False)
    assert resumed.fetched == shards[1:]
    assert_same_quantization(dst, reference)


def test_a_truncated_shard_is_named(ckpt, tmp_path):
    shard = shards_of(ckpt)[1]
    hub = FakeHub(ckpt, tmp_path / "scratch", truncate=shard)
    with pytest.raises(CheckpointError, match=f"{shard} is truncated"):
        quantize_from_hub("someone/mixtral", tmp_path / "q", QUANT, fetch=hub, device="cpu", progress=False)
    assert not (tmp_path / "scratch" / shard).exists(), "the bad shard was not deleted"


def test_another_source_in_the_same_directory_is_refused(ckpt, tmp_path):
    shards = shards_of(ckpt)
    dst = tmp_path / "q"
    with pytest.raises(ConnectionError):
        quantize_from_hub("someone/mixtral", dst, QUANT, fetch=FakeHub(ckpt, tmp_path / "s", fail_on=shards[1]),
                          device="cpu", progress=False)
    with pytest.raises(ValueError, match="someone/mixtral"):
        quantize_from_hub("other/model", dst, QUANT, fetch=FakeHub(ckpt, tmp_path / "s"), device="cpu",
                          progress=False)


# -- a quantized directory already on the Hub ------------------------------------------------------
def fake_snapshot(src: Path):
    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copyfile(f, out / f.name)
        return str(out)
    return snapshot_download


def test_load_a_quantized_directory_from_the_hub(reference, tmp_path):
    model = load_from_hub("someone/mixtral-2bit", local_dir=tmp_path / "dl",
                          snapshot_download=fake_snapshot(reference), device="cpu", dtype=torch.float32,
                          experts_on_device=2, prefetch=1, progress=False)
    assert torch.equal(greedy(model), greedy(load(reference)))


def test_an_original_checkpoint_is_not_a_quantized_one(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not a moe_colab quantized directory"):
        download_quantized("someone/mixtral", tmp_path / "dl", snapshot_download=fake_snapshot(ckpt))
