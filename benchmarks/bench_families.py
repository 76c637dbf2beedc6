"""Benchmark Qwen3-30B-A3B, gpt-oss-20b (or any preset of moe_colab.config.FAMILY_PRESETS) at
their real shapes with synthetic low-bit experts, under a free T4's budget: see
moe_colab/bench/families.py for the rows and what each measures.

    python benchmarks/bench_families.py --model qwen3-30b-a3b --quant attn4-exp4,attn4-exp3 --out docs
    python benchmarks/bench_families.py --model gpt-oss-20b --quant attn4-exp4 --out docs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_colab.bench.families import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
