"""Issue 12's fault probe, case by case: each bad input is refused with one line that names the
thing (file, layer, expert, tensor, expected and got), before anything large is allocated, and
each good-but-unusual input gives what transformers gives. docs/reliability.md is the table of
these cases; the ids below are its ids.

Concurrency is in test_reliability_threads.py, the command line in test_cli.py, damaged
quantized directories in test_convert_integrity.py, interrupts in test_faults.py.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

import moe_colab
from conftest import write_checkpoint
from moe_colab.checkpoint import CheckpointError
from moe_colab.config import MODEL_PRESETS
from moe_colab.planner import PlanError

IDS = torch.tensor([[5, 9, 17, 33, 2, 71, 8]])


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """One unsharded checkpoint (model.safetensors), 2 layers of 4 experts."""
    return write_checkpoint(tmp_path_factory.mktemp("rel") / "ck", layers=2, experts=4, top_k=2, hidden=32,
                            intermediate=64, vocab=128, seed=4)


def load(path, **kw):
    kw = {"device": "cpu", "dtype": torch.float32, "progress": False, "experts_on_device": 2, **kw}
    return moe_colab.load_model(path, **kw)


def greedy(model, ids=IDS, n=8):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def edited(src, dst, change):
    """A copy of checkpoint ``src`` whose tensors ``change(state_dict)`` edits in place."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    change(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


W1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def _set(name, value):
    def change(sd):
        sd[name] = value(sd)
    return change


def _drop(name):
    return lambda sd: sd.pop(name)


# -- checkpoints that disagree with their config: named from the headers, before the store -------
BAD_TENSORS = {
    "expert-shape": (_set(W1, lambda sd: torch.zeros(10, 32)),
                     r"model.safetensors: model.layers.1.block_sparse_moe.experts.2.w1.weight \(layer 1, expert 2, "
                     r"w1\) has shape \[10, 32\], config.json needs \[64, 32\]"),
    "expert-beyond-config": (_set(W1.replace("experts.2", "experts.7"), lambda sd: sd[W1].clone()),
                             r"experts.7.w1.weight is expert 7 of layer 1, but config.json has 4 experts per layer"),
    "layer-beyond-config": (_set(W1.replace("layers.1", "layers.5"), lambda sd: sd[W1].clone()),
                            r"layers.5.block_sparse_moe.experts.2.w1.weight belongs to layer 5, but config.json has "
                            r"2 layers"),
    "expert-missing": (_drop(W1), r"the checkpoint lacks 1 tensor\(s\) its config.json needs, e.g. "
                                  r"\['model.layers.1.block_sparse_moe.experts.2.w1.weight'\]"),
    "trunk-shape": (_set("model.norm.weight", lambda sd: torch.ones(31)),
                    r"model.safetensors: model.norm.weight has shape \[31\], config.json needs \[32\]"),
    "trunk-missing": (_drop("model.norm.weight"), r"lacks 1 tensor\(s\) .*\['model.norm.weight'\]"),
    "trunk-unexpected": (_set("model.extra.weight", lambda sd: torch.ones(3)),
                         r"model.safetensors: model.extra.weight fits no parameter"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_a_checkpoint_that_disagrees_with_its_config_is_named(ck, tmp_path, case, monkeypatch):
    change, message = BAD_TENSORS[case]
    bad = edited(ck, tmp_path / case, change)
    stores = _count_stores(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        load(bad)
    assert stores == [], "the expert store was allocated before the tensors were checked"


def _count_stores(monkeypatch) -> list:
    """Watch (not replace) the expert store's construction: a list that grows per store built."""
    from moe_colab.engine import build
    made, real = [], build.ExpertStore

    class Watched(real):
        def __init__(self, *a, **k):
            made.append(a)
            super().__init__(*a, **k)
    monkeypatch.setattr(build, "ExpertStore", Watched)
    return made


def test_mixtral_8x7b_config_over_a_tiny_shard_is_named_before_any_store(tmp_path, monkeypatch):
    """The probe's case: a Mixtral-8x7B config.json over one small tensor. With a host budget that
    holds every expert (so the memory plan passes), the tensors are still compared first: no
    86 GB store, a one-line error naming what is missing."""
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **MODEL_PRESETS["mixtral-8x7b"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.norm.weight": torch.ones(4096)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", "4TiB")
    monkeypatch.setenv("MOE_COLAB_DEVICE_BYTES", "4TiB")
    stores = _count_stores(monkeypatch)
    with pytest.raises(CheckpointError, match=r"lacks 994 tensor\(s\) its config.json needs"):
        load(tmp_path, dtype=torch.float16)
    assert stores == []


def test_a_wrong_shape_checkpoint_that_fits_is_named_cheaply(ck, tmp_path, monkeypatch):
    """config.json asks for wider layers than the tensors hold (the plan fits: ~100 MB)."""
    bad = tmp_path / "wider"
    shutil.copytree(ck, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 512, "intermediate_size": 4096}))
    stores = _count_stores(monkeypatch)
    with pytest.raises(CheckpointError, match=r"has shape \[\d+(, \d+)?\], config.json needs"):
        load(bad)
    assert stores == []


# -- files and paths ------------------------------------------------------------------------------
def test_a_file_given_as_the_model_path(ck):
    with pytest.raises(CheckpointError, match=r"is a file, not a directory.*pass the directory that holds it"):
        load(ck / "model.safetensors")


@pytest.mark.parametrize("text,message", [("[1, 2]", r"config.json holds a JSON list, not an object"),
                                          ("{nope", r"config.json is not valid JSON"),
                                          ('"mixtral"', r"config.json holds a JSON str")])
def test_config_json_that_is_not_an_object(ck, tmp_path, text, message):
    bad = tmp_path / "cfg"
    shutil.copytree(ck, bad)
    (bad / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load(bad)


def test_non_json_generation_config_is_named_before_weights_load(ck, tmp_path, monkeypatch):
    bad = tmp_path / "gen"
    shutil.copytree(ck, bad)
    (bad / "generation_config.json").write_text("{not json")
    stores = _count_stores(monkeypatch)
    with pytest.raises(CheckpointError, match=r"generation_config.json \(generation settings\) is not valid JSON"):
        load(bad)
    assert stores == []


def test_an_index_without_weight_map_is_named(tmp_path):
    src = write_checkpoint(tmp_path / "sharded", shard_size="40KB")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index.json is not a valid safetensors index: no weight_map"):
        load(src)


def test_a_header_that_is_json_but_not_a_tensor_table_is_named(ck, tmp_path):
    bad = tmp_path / "hdr"
    shutil.copytree(ck, bad)
    body = b'["not", "a", "table"]'
    (bad / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(CheckpointError, match=r"model.safetensors has a corrupt header"):
        load(bad)


# -- arguments ------------------------------------------------------------------------------------
BAD_ARGUMENTS = {
    "dtype-int8": (dict(dtype=torch.int8), ValueError, r"dtype=torch.int8 cannot run a model"),
    "dtype-bool": (dict(dtype=torch.bool), ValueError, r"dtype=torch.bool cannot run a model"),
    "dtype-complex64": (dict(dtype=torch.complex64), ValueError, r"dtype=torch.complex64 cannot run a model"),
    "dtype-float8": (dict(dtype=torch.float8_e4m3fn), ValueError, r"dtype=torch.float8_e4m3fn cannot run"),
    "dtype-name": (dict(dtype="float17"), ValueError, r"dtype='float17': use one of"),
    "dtype-object": (dict(dtype=3), TypeError, r"dtype must be a torch.dtype"),
    "swap-no": (dict(swap="no"), TypeError, r"swap must be True, False or None, got 'no'"),
    "swap-1": (dict(swap=1), TypeError, r"swap must be True, False or None, got 1"),
    "cuda_graphs-str": (dict(cuda_graphs="off"), TypeError, r"cuda_graphs must be True, False or None"),
    "options-dict": (dict(options={"prefetch": 1}), TypeError, r"options must be a moe_colab.OffloadOptions"),
    "experts-str": (dict(experts_on_device="4"), TypeError, r"experts_on_device must be an int or 'auto'"),
    "experts-0": (dict(experts_on_device=0), ValueError, r"experts_on_device=0 is outside 1..4"),
    "experts-9": (dict(experts_on_device=9), ValueError, r"experts_on_device=9 is outside 1..4"),
    "prefetch-true": (dict(prefetch=True), TypeError, r"prefetch must be an int, got True"),
    "prefetch-5": (dict(prefetch=5), ValueError, r"prefetch=5 is outside 0..4"),
    "guess_from": (dict(guess_from="sideways"), ValueError, r"guess_from must be one of"),
    "max_context-0": (dict(max_context=0), ValueError, r"max_context must be a positive int"),
    "max_context-str": (dict(max_context="4k"), ValueError, r"max_context must be a positive int"),
    "device-gpu": (dict(device="gpu"), ValueError, r"unsupported device 'gpu'; use 'cuda' or 'cpu'"),
    "device-mps": (dict(device="mps"), ValueError, r"unsupported device 'mps'"),
    "quant-bogus": (dict(quant="bogus"), ValueError, r"unknown quantization preset 'bogus'"),
    "quant-int": (dict(quant=4), TypeError, r"quant must be None, a preset name or a QuantConfig"),
    "extra_host_rows": (dict(extra_host_rows=-1, swap=True), ValueError, r"extra_host_rows must be an int >= 0"),
    "quant-groups": (dict(quant="paper-2bit"), ValueError, r"attn_group_size=64 does not divide the input "
                                                           r"dimension 32"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_a_bad_argument_is_one_line_naming_it(ck, case):
    kwargs, exc, message = BAD_ARGUMENTS[case]
    with pytest.raises(exc, match=message) as err:
        load(ck, **kwargs)
    assert "\n" not in str(err.value)


def test_cuda_where_there_is_none(ck):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for device in ("cuda", "cuda:1", 0):
        with pytest.raises(RuntimeError, match="CUDA is not available here"):
            load(ck, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, "float32", "bfloat16"])
def test_other_compute_dtypes_and_dtype_names_load(ck, dtype):
    model = load(ck, dtype=dtype)
    assert model.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, dtype)


@pytest.mark.parametrize("spelling", [None, "none", "fp16", "16-bit", "16bit", "16", "None"])
def test_every_no_quantization_spelling_equals_transformers(ck, spelling):
    ref = MixtralForCausalLM.from_pretrained(ck, dtype=torch.float32)
    want, got = greedy(ref), greedy(load(ck, quant=spelling))
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


# -- tied embeddings load as transformers loads them ----------------------------------------------
def test_tied_embeddings_load_as_transformers_loads_them(tmp_path):
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        tie_word_embeddings=True)
    torch.manual_seed(7)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    ref = MixtralForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32)
    ours = load(tmp_path / "tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    want, got = greedy(ref), greedy(ours)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_a_tied_checkpoint_that_also_holds_lm_head_loads(tmp_path):
    """Some writers store the tied copy too; transformers ignores it, so does the loader."""
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        tie_word_embeddings=True)
    torch.manual_seed(8)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    f = tmp_path / "tied" / "model.safetensors"
    sd = load_file(str(f))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(f), metadata={"format": "pt"})
    ref = MixtralForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32)
    assert torch.equal(greedy(load(tmp_path / "tied", experts_on_device=1))[0], greedy(ref)[0])


# -- the planner ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(host_bytes=float("inf")), r"host_bytes must be a positive, finite number of bytes.*got inf"),
    (dict(host_bytes=float("nan")), r"host_bytes must be a positive, finite number of bytes.*got nan"),
    (dict(device_bytes=float("inf"), host_bytes=12.7e9), r"device_bytes must be a positive, finite"),
    (dict(host_bytes=-1), r"host_bytes must be a positive"),
    (dict(host_bytes="12GB"), r"host_bytes must be a positive"),
])
def test_plan_refuses_budgets_that_are_not_byte_counts(kw, message):
    with pytest.raises(ValueError, match=message):
        moe_colab.plan("mixtral-8x7b", "paper-2bit", **kw)


@pytest.mark.parametrize("text", ["inf", "nan", "-1GB", "0", "GB", "12.7.1GB"])
def test_a_budget_in_the_environment_that_is_not_a_byte_count_is_named(ck, monkeypatch, text):
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", text)
    with pytest.raises(ValueError, match=r"\$MOE_COLAB_HOST_BYTES: cannot read .* as a byte count"):
        load(ck)


def test_plan_of_a_file_names_it(ck):
    with pytest.raises(FileNotFoundError, match="model.safetensors' is not a preset"):
        moe_colab.plan(ck / "model.safetensors")


def test_a_refused_plan_is_a_plan_error_with_what_would_fit():
    with pytest.raises(PlanError, match=r"what would fit instead:\n  - quant='paper-2bit'"):
        moe_colab.plan("mixtral-8x7b", None, device_bytes=15 * 2**30, host_bytes=12.7e9)


# -- routing traces -------------------------------------------------------------------------------
def test_routing_trace_load_names_the_file(tmp_path, ck):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"garbage.pt is not a routing trace"):
        moe_colab.RoutingTrace.load(garbage)
    with pytest.raises(ValueError, match=r"model.safetensors is a safetensors file but not a moe_colab RoutingTrace"):
        moe_colab.RoutingTrace.load(ck / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"is a directory; a routing trace is one file"):
        moe_colab.RoutingTrace.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no routing trace at .*nowhere.pt"):
        moe_colab.RoutingTrace.load(tmp_path / "nowhere.pt")


# -- inference only: .half()/.to()/.train() after loading -----------------------------------------
@pytest.mark.parametrize("call,target", [
    (lambda m: m.half(), "float16 on cpu"),
    (lambda m: m.to(torch.float16), "float16 on cpu"),
    (lambda m: m.to(torch.bfloat16), "bfloat16 on cpu"),
    (lambda m: m.double(), "float64 on cpu"),
    (lambda m: m.to("meta"), "float32 on meta"),
], ids=["half", "to-float16", "to-bfloat16", "double", "to-meta"])
def test_changing_dtype_or_device_after_loading_refuses_and_keeps_the_model(ck, call, target):
    model = load(ck)
    want = greedy(model)
    with pytest.raises(RuntimeError, match=rf"cannot change device or dtype after loading \(it holds float32 on cpu, "
                                           rf"this asks for {target}\).*load_model\(path, device=..., dtype=...\)"):
        call(model)
    got = greedy(model)                   # nothing was converted half-way
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cuda_after_loading_on_cpu_refuses(ck):
    with pytest.raises(RuntimeError, match=r"cannot change device or dtype after loading"):
        load(ck).cuda()


def test_a_no_op_to_is_allowed(ck):
    model = load(ck)
    want = greedy(model)
    assert model.to("cpu") is model and model.float() is model and model.to(torch.float32) is model
    assert model.eval() is model
    assert torch.equal(greedy(model)[0], want[0])


def test_training_refuses_clearly(ck):
    model = load(ck)
    with pytest.raises(RuntimeError, match=r"for inference only.*fine-tune the original checkpoint"):
        model.train()
    with pytest.raises(RuntimeError, match=r"for inference only"):
        model.requires_grad_(True)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_save_pretrained_refuses_clearly(ck, tmp_path):
    with pytest.raises(NotImplementedError, match=r"keeps its experts outside the module tree"):
        load(ck).save_pretrained(tmp_path / "out")


# -- prompts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids,message", [
    (torch.tensor([[3, 400, 5]]), r"token id 400, outside this model's vocabulary 0..127"),
    (torch.tensor([[3, -1, 5]]), r"token id -1, outside this model's vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty"),
    (torch.tensor([[3.0, 4.0]]), r"scalar types: Long, Int; but got torch.FloatTensor"),   # transformers' own
], ids=["beyond-vocab", "negative", "empty", "float"])
def test_a_prompt_the_embedding_cannot_read_is_named(ck, ids, message):
    model = load(ck)
    with pytest.raises((ValueError, RuntimeError), match=message):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy(model)[0], greedy(load(ck))[0])


# -- good inputs stay good ------------------------------------------------------------------------
def test_left_padding_beam_search_and_seeded_sampling_equal_transformers(ck):
    ref, ours = MixtralForCausalLM.from_pretrained(ck, dtype=torch.float32), load(ck, prefetch=1)
    ids = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    for kw in (dict(do_sample=False), dict(num_beams=3, do_sample=False),
               dict(do_sample=True, temperature=0.8, top_p=0.9)):
        outs = []
        for m in (ref, ours):
            torch.manual_seed(11)
            outs.append(m.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw))
        assert torch.equal(outs[0], outs[1]), kw


def test_a_text_generation_pipeline_runs(tmp_path):
    from transformers import AutoTokenizer, pipeline
    path = write_checkpoint(tmp_path / "tok", vocab=300, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(path)
    ref = pipeline("text-generation", model=MixtralForCausalLM.from_pretrained(path, dtype=torch.float32),
                   tokenizer=tok, device="cpu")
    ours = pipeline("text-generation", model=load(path), tokenizer=tok, device="cpu")   # calls model.to("cpu")
    kw = dict(max_new_tokens=6, do_sample=False)
    assert ours("def f(x):", **kw)[0]["generated_text"] == ref("def f(x):", **kw)[0]["generated_text"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_an_expert_stored_in_another_dtype_is_cast_as_transformers_casts_it(ck, tmp_path, dtype):
    odd = edited(ck, tmp_path / "odd", _set(W1, lambda sd: sd[W1].mul(40).to(dtype)))
    ref = MixtralForCausalLM.from_pretrained(odd, dtype=torch.float32)
    want, got = greedy(ref), greedy(load(odd))
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_a_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config.json in .*empty"):
        load(tmp_path / "empty")
