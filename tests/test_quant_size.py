"""estimate_size: exact for what quantize() writes, and Table 1 of the paper for Mixtral-8x7B."""
import re
from pathlib import Path

import pytest
import torch

import moe_colab
from conftest import write_checkpoint
from moe_colab.config import mixtral_config
from moe_colab.quant.config import QuantConfig
from moe_colab.quant.size import PAPER_TABLE1_GIB, bits_per_weight, estimate_size, table1_markdown, table1_rows

ROOT = Path(__file__).resolve().parents[1]
PAPER_MD = Path("/work/shared/reference/paper.md")


@pytest.mark.skipif(not PAPER_MD.is_file(), reason="the shared paper notes are not on this machine")
def test_our_copy_of_table1_is_the_papers():
    rows = {}
    for line in PAPER_MD.read_text().splitlines():
        m = re.match(r"\| (FP16|\d-bit) \| (FP16|\d-bit) \| ([\d.]+) \|", line)
        if m:
            b = lambda s: 16 if s == "FP16" else int(s[0])
            rows[(b(m[1]), b(m[2]))] = float(m[3])
    assert rows == PAPER_TABLE1_GIB


def test_fp16_is_the_papers_46_7b_parameters_in_gib():
    cfg = mixtral_config("mixtral-8x7b")
    assert estimate_size(cfg, None) == estimate_size(cfg, QuantConfig(16, 16))
    assert abs(estimate_size(cfg, None) / 2 - 46.7e9) < 0.01e9
    assert round(estimate_size(cfg, None) / 2**30, 2) == PAPER_TABLE1_GIB[(16, 16)]


def test_table1_within_3_percent_or_explained():
    rows = {(r["attn"], r["experts"]): r for r in table1_rows()}
    assert len(rows) == 16
    for (a, e), r in rows.items():
        if e == 16:        # 16-bit experts: the attention schemes alone, matched to 0.1 GiB
            assert abs(r["ours_gib"] - r["paper_gib"]) < 0.1, (a, e)
        if 3 not in (a, e):
            assert abs(r["diff_pct"]) <= 3.0, (a, e, r["diff_pct"])
        else:
            # explained in docs/quantization.md: hqq 0.1 packed 3-bit codes in 3.5 bits per weight;
            # counted that way, every row is within 3%
            assert abs(r["hqq01_diff_pct"]) <= 3.0, (a, e, r["hqq01_diff_pct"])
    assert abs(rows[(16, 3)]["diff_pct"]) > 10        # the 3-bit rows really do differ


def test_bits_per_weight_of_each_scheme():
    assert bits_per_weight(4, 64, 256) == pytest.approx(4 + 16 / 64 + 64 / (64 * 256))
    assert bits_per_weight(3, 64, 128) == pytest.approx(3 + 16 / 64 + 64 / (64 * 128))
    assert bits_per_weight(2, 16, 128) == pytest.approx(2 + 16 / 16 + 64 / (16 * 128))
    assert bits_per_weight(16, None, None) == 16


def test_docs_show_the_current_table():
    doc = (ROOT / "docs" / "quantization.md").read_text()
    assert table1_markdown() in doc


@pytest.mark.parametrize("quant", ["paper-2bit", QuantConfig(3, 4), QuantConfig(2, 16)])
def test_estimate_equals_the_bytes_quantize_writes(tmp_path, quant):
    from safetensors import safe_open
    ck = write_checkpoint(tmp_path / "ck", layers=2, experts=3, hidden=64, intermediate=128, seed=7)
    dst = moe_colab.quantize(ck, tmp_path / "q", quant, progress=False, device="cpu", dtype=torch.float16)
    stored = 0
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                # the checkpoint is float32; estimate_size counts 16-bit trunk tensors
                stored += t.numel() * (2 if t.dtype == torch.float32 else t.element_size())
    from transformers import MixtralConfig
    assert estimate_size(MixtralConfig.from_pretrained(ck), quant) == stored
