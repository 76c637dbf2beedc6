"""The family benchmark (moe_colab/bench/families.py) end to end on CPU at tiny widths: every row
runs on the same replayed routing, the engine rows generate the same tokens, batching changes no
token, and the report is written."""
from __future__ import annotations

import json

import pytest

from moe_colab.bench.families import main


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_family_bench_cpu_rows(model, tmp_path):
    assert main(["--model", model, "--scale", "tiny", "--device", "cpu", "--quick", "--prompts", "6",
                 "--decode-tokens", "6", "--quant", "attn4-exp4", "--results-dir", str(tmp_path), "--name", "t",
                 "--out", str(tmp_path), "--max-minutes", "5"]) == 0
    res = json.loads((tmp_path / f"families_{model}_t.json").read_text())
    q = res["quants"]["attn4-exp4"]
    rows = q["rows"]
    assert set(rows) == {"colab", "colab_copy", "colab_copy_unbatched", "naive"}
    for name, r in rows.items():
        assert "error" not in r and "skipped" not in r, (name, r)
        assert r["decode_tokens_per_s"] > 0
    # the same model, weights and routing: the same tokens in every engine row, batched or not
    assert rows["colab"]["tokens"] == rows["colab_copy"]["tokens"] == rows["colab_copy_unbatched"]["tokens"]
    assert rows["colab_copy"]["options"]["batched_experts"] and not rows["colab_copy_unbatched"]["options"]["batched_experts"]
    assert rows["colab_copy"]["profile"]["wall_ms_per_token"] > 0
    assert res["shapes"]["experts"] == 16 and res["shapes"]["top_k"] == 4
    assert "attn4-exp4" in (tmp_path / f"benchmarks_{model}.md").read_text()
