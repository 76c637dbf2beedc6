"""QuantConfig, the paper's presets and resolve_quant: defaults per bit width and clear errors."""
import dataclasses

import pytest

import moe_colab
from moe_colab.config import mixtral_config
from moe_colab.quant.config import PAPER_GROUPS, PRESETS, QuantConfig, resolve_quant


def test_presets_are_the_papers():
    assert resolve_quant("paper-2bit") == QuantConfig(attn_bits=4, expert_bits=2)
    assert resolve_quant("paper-3bit") == QuantConfig(attn_bits=4, expert_bits=3)
    q = resolve_quant("paper-2bit")
    assert q.matrix("attn") == (4, 64, 256) and q.matrix("expert") == (2, 16, 128)
    assert resolve_quant("paper-3bit").matrix("expert") == (3, 64, 128)
    assert moe_colab.QuantConfig is QuantConfig


@pytest.mark.parametrize("a", [16, 4, 3, 2])
@pytest.mark.parametrize("e", [16, 4, 3, 2])
def test_every_pair_has_the_papers_groups(a, e):
    q = QuantConfig(a, e)
    for part, bits in (("attn", a), ("expert", e)):
        assert q.matrix(part) == ((16, None, None) if bits == 16 else (bits,) + PAPER_GROUPS[bits])
    assert QuantConfig.from_dict(q.to_dict()) == q
    assert q.is_noop == (a == e == 16)
    q.validate_for(mixtral_config("mixtral-8x7b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.attn_bits = 4


def test_resolve_accepts_none_presets_and_configs():
    assert resolve_quant(None) is None
    q = QuantConfig(16, 3, expert_group_size=32)
    assert resolve_quant(q) is q and q.matrix("expert") == (3, 32, 128)
    assert resolve_quant("PAPER-2BIT") == PRESETS["paper-2bit"]
    assert QuantConfig(4, 2).name == "paper-2bit"
    assert q.name == "attn16-exp3g32s128"


def test_clear_errors():
    with pytest.raises(ValueError, match="unsupported bit width expert_bits=8"):
        QuantConfig(4, 8)
    with pytest.raises(ValueError, match="unsupported bit width attn_bits=1"):
        QuantConfig(1, 2)
    with pytest.raises(ValueError, match="unsupported expert group size 0"):
        QuantConfig(4, 2, expert_group_size=0)
    with pytest.raises(ValueError, match="unknown quantization preset 'paper-1bit'.*paper-2bit"):
        resolve_quant("paper-1bit")
    with pytest.raises(TypeError, match="quant must be"):
        resolve_quant(4)
    # a group that does not divide an input dimension names the matrix and the dimension
    debug = mixtral_config("debug", hidden_size=96, intermediate_size=192)
    with pytest.raises(ValueError, match="attn_group_size=64 does not divide the input dimension 96"):
        QuantConfig(4, 16).validate_for(debug)
    with pytest.raises(ValueError, match=r"expert_group_size=64 does not divide the input dimension 96 of w1/w3"):
        QuantConfig(16, 3).validate_for(debug)
    QuantConfig(16, 2).validate_for(debug)   # group 16 divides 96 and 192
    with pytest.raises(ValueError, match="not a multiple of 8"):
        QuantConfig(16, 2, expert_group_size=4).validate_for(mixtral_config("debug", hidden_size=100, num_attention_heads=4))


def test_sixteen_bit_parts_have_no_groups_even_after_replace():
    q = dataclasses.replace(QuantConfig(4, 2), attn_bits=16)
    assert q.matrix("attn") == (16, None, None) and q.matrix("expert") == (2, 16, 128)
