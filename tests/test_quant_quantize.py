"""quantize(): streamed, resumable, verified; the loader API reads back exactly what was written."""
import copy
import json
import os

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.checkpoint import CheckpointError
from moe_colab.convert import manifest as qm
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.experts import model_from_quantized_dir, quantize_model_

LAYERS, EXPERTS = 3, 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # several shards, so layers straddle shard boundaries
    return write_checkpoint(tmp_path_factory.mktemp("src") / "ck", layers=LAYERS, experts=EXPERTS, top_k=1,
                            hidden=64, intermediate=128, shard_size="40KB", seed=5)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """An uninterrupted paper-2bit run."""
    return moe_colab.quantize(ckpt, tmp_path_factory.mktemp("ref") / "q", "paper-2bit", progress=False, device="cpu")


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


def test_directory_round_trips_to_the_in_memory_quantized_model(ckpt, reference):
    from transformers import MixtralForCausalLM
    assert (ckpt / "model.safetensors.index.json").is_file()
    assert qm.is_quantized_dir(reference) and not qm.is_quantized_dir(ckpt)
    manifest, qcfg = qm.open_quantized(reference, verify="full")
    assert qcfg == QuantConfig(4, 2) and manifest["complete"]
    assert set(manifest["files"]) == {"trunk.safetensors"} | {qm.layer_file(l) for l in range(LAYERS)}
    assert manifest["config"]["hidden_size"] == 64

    original = MixtralForCausalLM.from_pretrained(ckpt).eval()
    resident = quantize_model_(copy.deepcopy(original), qcfg, device="cpu")
    loaded = model_from_quantized_dir(reference)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, orig = resident(ids).logits, loaded(ids).logits, original(ids).logits
    assert torch.equal(got, want)
    assert 0 < (got - orig).abs().max()          # it really is quantized

    # loader API: one uint8 buffer per expert, trunk with QuantLinear buffers and 16-bit rest
    rows = list(qm.iter_quantized_experts(reference, manifest))
    assert [(l, e) for l, e, _ in rows] == [(l, e) for l in range(LAYERS) for e in range(EXPERTS)]
    assert all(b.dtype == torch.uint8 and b.numel() == manifest["expert_nbytes"] for _, _, b in rows)
    trunk = qm.load_trunk_state_dict(reference, manifest)
    assert "model.layers.0.self_attn.q_proj.q4" in trunk and "model.layers.0.self_attn.q_proj.weight" not in trunk
    assert "model.layers.0.mlp.gate.weight" in trunk and "lm_head.weight" in trunk
    assert not any(".experts." in k for k in trunk)
    assert qm.expert_format_for(manifest).layout.nbytes == manifest["expert_nbytes"]


def test_interrupted_run_resumes_without_redoing_finished_layers(ckpt, reference, tmp_path):
    dst = tmp_path / "q"
    done = []

    def stop_after_layer_1(unit):
        done.append(unit)
        if unit == qm.layer_file(1):
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        moe_colab.quantize(ckpt, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=stop_after_layer_1)
    assert done == ["trunk.safetensors", qm.layer_file(0), qm.layer_file(1)]
    with pytest.raises(CheckpointError, match="did not finish.*again to resume"):
        qm.open_quantized(dst)
    stamps = {n: os.stat(dst / n).st_mtime_ns for n in done}

    redone = []
    moe_colab.quantize(ckpt, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=redone.append)
    assert redone == [qm.layer_file(2)]                                  # only the unfinished layer
    assert {n: os.stat(dst / n).st_mtime_ns for n in done} == stamps     # finished files untouched
    assert _files(dst) == _files(reference)                              # same bytes as one run
    assert json.loads((dst / qm.MANIFEST).read_text())["files"] == \
        json.loads((reference / qm.MANIFEST).read_text())["files"]
    # a finished directory is a no-op
    again = []
    moe_colab.quantize(ckpt, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=again.append)
    assert again == []


def test_damaged_finished_layer_is_redone(ckpt, reference, tmp_path):
    dst = tmp_path / "q"

    def stop(unit):
        if unit == qm.layer_file(0):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        moe_colab.quantize(ckpt, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=stop)
    data = bytearray((dst / qm.layer_file(0)).read_bytes())
    data[-1] ^= 0xFF                                                   # same size, other bytes
    (dst / qm.layer_file(0)).write_bytes(bytes(data))
    redone = []
    with pytest.warns(UserWarning, match="redoing layer_000.safetensors: .*sha256"):
        moe_colab.quantize(ckpt, dst, "paper-2bit", progress=False, device="cpu", on_unit_done=redone.append)
    assert redone == [qm.layer_file(0), qm.layer_file(1), qm.layer_file(2)]
    assert _files(dst) == _files(reference)


def test_manifest_that_does_not_match_its_tensors_is_named(reference, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    m = json.loads((bad / qm.MANIFEST).read_text())
    m["files"]["layer_001.safetensors"]["tensors"]["experts"]["shape"] = [EXPERTS, 12]
    (bad / qm.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"layer_001.safetensors: tensor 'experts' is \[2, \d+\] uint8 in the file"):
        qm.open_quantized(bad)

    shutil.copyfile(reference / qm.MANIFEST, bad / qm.MANIFEST)
    with open(bad / "trunk.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(bad / "trunk.safetensors") - 10)
    with pytest.raises(CheckpointError, match="trunk.safetensors has .* bytes"):
        qm.open_quantized(bad)

    shutil.copyfile(reference / "trunk.safetensors", bad / "trunk.safetensors")
    m = json.loads((bad / qm.MANIFEST).read_text())
    m["files"]["trunk.safetensors"]["tensors"]["model.norm.extra"] = {"shape": [64], "dtype": "float32"}
    (bad / qm.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="trunk.safetensors: tensor 'model.norm.extra' listed"):
        qm.open_quantized(bad)

    shutil.copyfile(reference / qm.MANIFEST, bad / qm.MANIFEST)
    (bad / qm.layer_file(2)).unlink()
    with pytest.raises(CheckpointError, match="layer_002.safetensors is listed .* but missing"):
        qm.open_quantized(bad)


def test_other_scheme_and_other_job_are_refused(ckpt, reference, tmp_path):
    with pytest.raises(ValueError, match=r"quantized with 'paper-2bit'.*quant='paper-3bit'"):
        qm.open_quantized(reference, "paper-3bit")
    with pytest.raises(ValueError, match="quantized with 'paper-2bit'"):
        qm.open_quantized(reference, QuantConfig(16, 2))
    assert qm.open_quantized(reference, "paper-2bit")[1] == QuantConfig(4, 2)
    assert qm.open_quantized(reference, None)[1] == QuantConfig(4, 2)
    with pytest.raises(ValueError, match="already holds a different quantization"):
        moe_colab.quantize(ckpt, reference, "paper-3bit", progress=False, device="cpu")
    with pytest.raises(ValueError, match="nothing to write"):
        moe_colab.quantize(ckpt, tmp_path / "x", None, progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        moe_colab.quantize(ckpt, tmp_path / "x", QuantConfig(16, 4, expert_group_size=48), progress=False)
    with pytest.raises(CheckpointError, match="not a quantized directory"):
        qm.open_quantized(ckpt)


def test_16_bit_experts_and_3_bit_attention(ckpt, tmp_path):
    dst = moe_colab.quantize(ckpt, tmp_path / "q", QuantConfig(3, 16), progress=False, device="cpu",
                             dtype=torch.float32)
    from transformers import MixtralForCausalLM
    original = MixtralForCausalLM.from_pretrained(ckpt).eval()
    want = quantize_model_(copy.deepcopy(original), QuantConfig(3, 16), device="cpu")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model_from_quantized_dir(dst)(ids).logits, want(ids).logits)


def test_cli_entry_point(ckpt, tmp_path, capsys):
    import argparse
    from moe_colab.convert.quantize import add_quantize_arguments, main_quantize
    p = argparse.ArgumentParser()
    add_quantize_arguments(p)
    args = p.parse_args([str(ckpt), str(tmp_path / "q"), "--quant", "16,2", "--device", "cpu", "--no-progress"])
    assert main_quantize(args) == 0
    assert qm.open_quantized(tmp_path / "q")[1] == QuantConfig(16, 2)
    assert "attention 16-bit, experts 2-bit" in capsys.readouterr().out
    with pytest.raises(ValueError, match="expected two bit widths"):
        main_quantize(p.parse_args([str(ckpt), str(tmp_path / "r"), "--quant", "4,x"]))
