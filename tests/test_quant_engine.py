"""A quantized model served through the offloading engine equals the same quantized model with
every expert resident, for every cache size and prefetch setting (and in swap mode)."""
from __future__ import annotations

import pytest
import torch

import moe_colab
from conftest import write_checkpoint

E = 4


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    ck = write_checkpoint(root / "ck", layers=2, experts=E, hidden=64, intermediate=128,
                          shard_size="60KB", seed=11)
    return ck, moe_colab.quantize(ck, root / "q2", quant="paper-2bit", progress=False)


@pytest.mark.parametrize("quant", ["paper-2bit", "paper-3bit"])
def test_offloaded_equals_resident_for_every_setting(quantized, quant, tmp_path):
    ck, q2 = quantized
    src = q2 if quant == "paper-2bit" else moe_colab.quantize(ck, tmp_path / "q3", quant=quant,
                                                              progress=False)
    resident = moe_colab.load_model(src, device="cpu", dtype=torch.float32, experts_on_device=E,
                                    prefetch=0, progress=False)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    seq = resident.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = resident(seq).logits
    for k in range(1, E + 1):
        for prefetch in range(0, E + 1):
            swap = (k + prefetch) % 2 == 0
            model = moe_colab.load_model(src, device="cpu", dtype=torch.float32, experts_on_device=k,
                                         prefetch=prefetch, swap=swap, progress=False)
            got_seq = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                     pad_token_id=0)
            assert torch.equal(got_seq, seq), (k, prefetch, swap)
            with torch.no_grad():
                torch.testing.assert_close(model(seq).logits, want, atol=1e-5, rtol=0)


def test_on_the_fly_quantization_equals_quantized_directory(quantized):
    ck, q2 = quantized
    a = moe_colab.load_model(ck, device="cpu", dtype=torch.float32, quant="paper-2bit",
                             experts_on_device=2, prefetch=1, progress=False)
    b = moe_colab.load_model(q2, device="cpu", dtype=torch.float32, experts_on_device=3, prefetch=2,
                             swap=True, progress=False)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=0)


def test_quantized_directory_with_another_scheme_is_refused(quantized):
    _, q2 = quantized
    with pytest.raises(ValueError, match="quantized with 'paper-2bit'.*paper-3bit"):
        moe_colab.load_model(q2, device="cpu", dtype=torch.float32, quant="paper-3bit", progress=False)
