"""Quantized directories that are damaged, mixed or misused are caught, by name: the one writer
records what a directory was made from, loading checks each unit's sha256 as it reads it (once:
a verified stamp keyed by size and mtime skips unchanged files), and a failed start leaves
nothing behind."""
from __future__ import annotations

import json

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.checkpoint import CheckpointError
from moe_colab.convert import manifest as qm


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    kw = dict(layers=3, experts=2, top_k=1, hidden=64, intermediate=128, shard_size="40KB")
    return write_checkpoint(root / "a", seed=5, **kw), write_checkpoint(root / "b", seed=6, **kw)


def load(path):
    return moe_colab.load_model(path, device="cpu", dtype=torch.float32, experts_on_device=1, prefetch=0,
                                progress=False)


def test_flipped_bytes_in_a_finished_directory_are_named_and_redone(two_sources, tmp_path):
    a, _ = two_sources
    dst = moe_colab.quantize(a, tmp_path / "q", "paper-2bit", progress=False, device="cpu")
    good = load(dst).generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    victim = dst / qm.layer_file(1)
    data = bytearray(victim.read_bytes())
    for i in range(1000, 5000):                   # 4,000 bytes flipped, same size
        data[-i] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"layer_001.safetensors: sha256 does not match.*quantize"):
        load(dst)
    redone = []
    with pytest.warns(UserWarning, match="redoing layer_001.safetensors"):
        moe_colab.quantize(a, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=redone.append)
    assert redone == [qm.layer_file(1)]
    again = load(dst).generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(again, good)


def test_an_unchanged_directory_is_not_hashed_again(two_sources, tmp_path, monkeypatch):
    a, _ = two_sources
    dst = moe_colab.quantize(a, tmp_path / "q", "paper-2bit", progress=False, device="cpu")
    hashed = []
    real = qm.sha256_file
    monkeypatch.setattr(qm, "sha256_file", lambda p, *k: hashed.append(p.name) or real(p, *k))
    load(dst)
    assert hashed == []                          # the writer stamped what it wrote
    (dst / qm.VERIFIED).unlink()                 # as after a download: no stamps
    load(dst)
    assert sorted(hashed) == sorted(["trunk.safetensors"] + [qm.layer_file(l) for l in range(3)])
    hashed.clear()
    load(dst)
    assert hashed == []                          # stamped by the first checked load


def test_another_source_into_an_unfinished_directory_is_refused(two_sources, tmp_path):
    a, b = two_sources
    dst = tmp_path / "q"

    def stop(unit):
        if unit == qm.layer_file(0):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        moe_colab.quantize(a, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=stop)
    with pytest.raises(ValueError, match=r"already holds a different quantization.*made from"):
        moe_colab.quantize(b, dst, "paper-2bit", progress=False, device="cpu")
    manifest = json.loads((dst / qm.MANIFEST).read_text())
    assert manifest["source"] == str(a) and not manifest["complete"]


def test_into_its_own_source_and_onto_a_file_are_refused(two_sources, tmp_path):
    a, _ = two_sources
    with pytest.raises(ValueError, match="is \\(inside\\) the source checkpoint"):
        moe_colab.quantize(a, a, "paper-2bit", progress=False, device="cpu")
    with pytest.raises(ValueError, match="is \\(inside\\) the source checkpoint"):
        moe_colab.quantize(a, a / "q", "paper-2bit", progress=False, device="cpu")
    assert not (a / qm.MANIFEST).exists() and not (a / "q").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        moe_colab.quantize(a, f, "paper-2bit", progress=False, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_failed_start_leaves_nothing_behind(two_sources, tmp_path):
    a, _ = two_sources
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        moe_colab.quantize(a, tmp_path / "q", "paper-2bit", progress=False, device="cuda")
    assert not (tmp_path / "q").exists()


def test_a_manifest_missing_keys_is_named(two_sources, tmp_path):
    a, _ = two_sources
    dst = moe_colab.quantize(a, tmp_path / "q", "paper-2bit", progress=False, device="cpu")
    m = json.loads((dst / qm.MANIFEST).read_text())
    del m["expert_layout"], m["scheme"]
    (dst / qm.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"lacks \['scheme', 'expert_layout'\]"):
        load(dst)


def test_a_changed_source_is_refused_on_resume(tmp_path):
    src = write_checkpoint(tmp_path / "src", layers=2, experts=2, top_k=1, hidden=64, intermediate=128, seed=1)
    dst = tmp_path / "q"

    def stop(unit):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        moe_colab.quantize(src, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=stop)
    write_checkpoint(src, layers=2, experts=2, top_k=1, hidden=64, intermediate=128, seed=2, shard_size="30KB")
    with pytest.raises(ValueError, match="has changed since it was started"):
        moe_colab.quantize(src, dst, "paper-2bit", progress=False, device="cpu")
