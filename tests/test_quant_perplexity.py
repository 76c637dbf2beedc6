"""Perplexity on a token stream, and the 16-pair table built by swapping quantized modules."""
import copy
import math

import pytest
import torch

from conftest import write_checkpoint
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.experts import quantize_model_
from moe_colab.quant.perplexity import main, perplexity, perplexity_table, sample_tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ppl") / "ck", layers=2, experts=3, top_k=2,
                            hidden=64, intermediate=128, vocab=128, seed=3)


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():   # a peaked next-token distribution, as a trained model has
        model.lm_head.weight.mul_(30)
    return model


def test_perplexity_is_exp_of_the_models_own_loss(model):
    tokens = torch.randint(0, 128, (3 * 20 + 7,), generator=torch.Generator().manual_seed(0))
    windows = tokens[:60].view(3, 20)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, tokens, seq_len=20) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert perplexity(model, tokens, seq_len=20, batch_size=2) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert perplexity(model, tokens, seq_len=20, max_windows=1) == pytest.approx(math.exp(losses[0]), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([1]))


def test_table_equals_separately_quantized_models_and_restores_the_model(model):
    tokens = sample_tokens(model, 256, seed=1)
    assert tokens.shape == (256,) and torch.equal(tokens, sample_tokens(model, 256, seed=1))
    ids = tokens[:16][None]
    with torch.no_grad():
        before = model(ids).logits
    table = perplexity_table(model, tokens, bits=(16, 2), seq_len=32, progress=False)
    assert set(table) == {(16, 16), (16, 2), (2, 16), (2, 2)}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)            # restored to 16 bits
    assert table[(16, 16)] == pytest.approx(perplexity(model, tokens, seq_len=32), rel=1e-6)
    for a, e in [(2, 2), (16, 2)]:
        q = quantize_model_(copy.deepcopy(model), QuantConfig(a, e), device="cpu")
        assert table[(a, e)] == pytest.approx(perplexity(q, tokens, seq_len=32), rel=1e-5)
    assert table[(2, 2)] != table[(16, 16)]
    # the model's own samples are likelier under the 16-bit model than under 2-bit ones
    assert table[(16, 16)] < min(table[(2, 2)], table[(16, 2)], table[(2, 16)])


def test_cli_table_on_a_random_checkpoint(ckpt, capsys):
    assert main(["--model", str(ckpt), "--table", "--tokens", "64", "--seq-len", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith(("| FP16 |", "| 4-bit |", "| 3-bit |", "| 2-bit |"))]
    assert len(rows) == 16
    assert "| FP16 | FP16 |" in out and "| 2-bit | 3-bit |" in out and "size MiB" in out
    assert main(["--model", str(ckpt), "--quant", "paper-3bit", "--tokens", "64", "--seq-len", "32",
                 "--device", "cpu"]) == 0
    assert "perplexity (paper-3bit):" in capsys.readouterr().out
