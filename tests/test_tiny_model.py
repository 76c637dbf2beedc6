"""The built-in ``tiny`` model: it loads with plain transformers, it learned Python, its routing is
spread over the experts, and the script that trains it still runs.

Figures are recomputed here and compared with the ones the training run recorded in
docs/tiny_training.json.
"""
import json
import math
import platform
from pathlib import Path

import pytest
import torch

from moe_colab.tiny import data as tiny_data
from moe_colab.tiny import train as train_tiny
from moe_colab.checkpoint import builtin_model_path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "docs" / "tiny_training.json"


@pytest.fixture(scope="module")
def tiny_path():
    path = builtin_model_path("tiny")
    assert path is not None, "moe_colab/tiny/weights/config.json is missing: run python -m moe_colab.tiny.train"
    return path


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import MixtralForCausalLM
    torch.set_num_threads(1)
    return MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def metrics():
    return json.loads(METRICS.read_text())


@pytest.fixture(scope="module")
def heldout_texts():
    _, heldout, _ = tiny_data.stdlib_files()
    return tiny_data.read_sources(heldout)


def test_loads_with_transformers_as_a_float16_mixtral(tiny_path, model, tokenizer):
    c = model.config
    assert (c.model_type, c.num_local_experts, c.num_experts_per_tok) == ("mixtral", 8, 2)
    assert c.num_key_value_heads < c.num_attention_heads                      # grouped-query attention
    assert next(model.parameters()).dtype == torch.float32
    from safetensors import safe_open
    with safe_open(str(tiny_path / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
           (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 3)
    assert len(tokenizer) == c.vocab_size
    size = sum(f.stat().st_size for f in tiny_path.iterdir() if f.is_file())
    assert size <= 25_000_000, f"the shipped tiny model takes {size / 1e6:.1f} MB"


def test_tokenizer_round_trips_python_source(tokenizer, heldout_texts):
    samples = heldout_texts[:3] + ["def f(x):\r\n\treturn x  # café ✓ 漢字\n\n\n    ", "", " "]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE actually merged: real source takes well under one token per character.
    ids = tokenizer(heldout_texts[0])["input_ids"]
    assert len(ids) < 0.5 * len(heldout_texts[0])


def test_heldout_loss_beats_uniform_and_matches_the_record(model, tokenizer, heldout_texts, metrics):
    probe = tiny_data.heldout_probe(tokenizer, heldout_texts)               # [4, 128]
    assert probe.shape == (metrics["heldout_probe"]["files"], metrics["heldout_probe"]["tokens"])
    loss = train_tiny.loss_on_rows(model, probe)
    uniform = math.log(model.config.vocab_size)
    assert loss < 0.6 * uniform, f"held-out loss {loss:.3f} vs uniform {uniform:.3f}"
    # Same stdlib: the same tokens, so the same figure up to float noise; another Python: close.
    same_python = platform.python_version() == metrics["python"]
    assert abs(loss - metrics["heldout_probe"]["loss"]) < (0.05 if same_python else 0.5)
    assert abs(loss - metrics["heldout_loss"]) < 1.0          # the probe is a sample of the same split


def test_greedy_generation_from_def_looks_like_python(model, tokenizer):
    ids = tokenizer("def ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("def ") and len(text) > len("def ") + 10
    assert any(tok in text for tok in ("(", ":", "return", "self")), text


def test_routing_is_spread_across_experts(model, tokenizer, heldout_texts):
    snippet = tokenizer(heldout_texts[1], return_tensors="pt", truncation=True, max_length=256).input_ids
    for layer, load in enumerate(train_tiny.expert_load(model, snippet)):   # [layers][experts]
        assert sum(load) == pytest.approx(1.0)
        used = sum(x > 0 for x in load)
        assert used > 2, f"layer {layer} routes one snippet to only {used} experts: {load}"
    # Over many files no expert is starved and none takes most tokens (0.125 each is balance).
    stream = tiny_data.encode_stream(tokenizer.backend_tokenizer, heldout_texts)
    loads = torch.tensor(train_tiny.expert_load(model, tiny_data.spread_rows(stream, 128, 16)))
    assert loads.shape == (model.config.num_hidden_layers, model.config.num_local_experts)
    assert (loads > 0.01).sum(dim=1).min() >= 6, loads
    assert loads.max() < 0.35, loads


def test_config_preset_matches_the_shipped_model(model):
    from moe_colab.config import MODEL_PRESETS
    shipped = model.config.to_dict()
    for key, value in MODEL_PRESETS["tiny"].items():
        if key == "rope_theta":
            assert shipped["rope_parameters"]["rope_theta"] == value
        else:
            assert shipped[key] == value, key


def test_split_is_deterministic_and_small():
    train, heldout, root = tiny_data.stdlib_files()
    assert heldout and train and not set(train) & set(heldout)
    assert 0.005 < len(heldout) / (len(train) + len(heldout)) < 0.05
    assert all(tiny_data.is_heldout(p.relative_to(root).as_posix()) for p in heldout)
    assert not any("site-packages" in p.parts or "test" in p.relative_to(root).parts for p in train)


def test_data_order_depends_on_seed_and_step_only():
    stream = torch.arange(10_000, dtype=torch.int32)
    a = tiny_data.batch_at(stream, 7, 4, 16, seed=1)
    assert a.shape == (4, 17) and torch.equal(a, tiny_data.batch_at(stream, 7, 4, 16, seed=1))
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)                               # contiguous windows
    assert not torch.equal(a, tiny_data.batch_at(stream, 8, 4, 16, seed=1))
    assert not torch.equal(a, tiny_data.batch_at(stream, 7, 4, 16, seed=2))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [train_tiny.lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train_tiny.lr_at(100, 100, 10, 1e-3) == pytest.approx(1e-4)


def test_training_script_runs_end_to_end_and_resumes(tmp_path):
    from transformers import AutoTokenizer, MixtralForCausalLM
    out, work = tmp_path / "tiny", tmp_path / "work"
    m = train_tiny.main(["--tiny-test", "--steps", "3", "--out", str(out), "--work-dir", str(work),
                         "--metrics", str(tmp_path / "metrics.json")])
    assert m["steps"] == 3 and (work / "state.pt").is_file()
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    loaded = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert loaded.config.vocab_size == len(tok) == 384
    assert json.loads((tmp_path / "metrics.json").read_text())["heldout_loss"] == pytest.approx(m["heldout_loss"])
    assert f"{m['heldout_loss']:.3f}" in (out / "README.md").read_text()
    # --resume continues from step 3 with the saved tokenizer and optimizer.
    m2 = train_tiny.main(["--tiny-test", "--steps", "5", "--resume", "--out", str(out), "--work-dir", str(work)])
    assert m2["steps"] == 5 and [t["step"] for t in m2["history"]["train"]][:1] == [2]
    vocab = lambda path: json.loads(path.read_text())["model"]["vocab"]
    assert vocab(work / "tokenizer.json") == vocab(out / "tokenizer.json")


def test_max_minutes_stops_cleanly_and_still_saves(tmp_path):
    m = train_tiny.main(["--tiny-test", "--steps", "50", "--max-minutes", "0", "--out", str(tmp_path / "o"),
                         "--work-dir", str(tmp_path / "w")])
    assert m["stopped_early"] and m["steps"] == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_balance_loss_sees_per_layer_collapse_that_pooled_loss_misses():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    tokens, experts = 64, 4
    uniform = torch.randn(tokens, experts) * 1e-3                    # every expert equally likely
    to_01 = torch.tensor([8.0, 8.0, 0.0, 0.0]).expand(tokens, experts)  # layer sends all to 0 and 1
    to_23 = to_01.flip(-1)                                            # layer sends all to 2 and 3
    balanced = train_tiny.balance_loss((uniform, uniform), top_k=2)
    collapsed = train_tiny.balance_loss((to_01, to_23), top_k=2)
    assert balanced.item() == pytest.approx(1.0, abs=0.01)
    assert collapsed.item() == pytest.approx(2.0, abs=0.01)          # E / k: the worst case
    # transformers pools the layers' counts, so the same two collapsed layers look balanced to it.
    pooled = load_balancing_loss_func((to_01, to_23), experts, 2)
    pooled_uniform = load_balancing_loss_func((uniform, uniform), experts, 2)
    assert pooled.item() == pytest.approx(pooled_uniform.item(), abs=0.01)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_tiny.main(["--tiny-test", "--resume", "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")])


def test_training_is_reproducible(tmp_path):
    from safetensors.torch import load_file
    runs = []
    for name in ("a", "b"):
        train_tiny.main(["--tiny-test", "--steps", "3", "--out", str(tmp_path / name), "--work-dir", str(tmp_path / f"w{name}")])
        runs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
