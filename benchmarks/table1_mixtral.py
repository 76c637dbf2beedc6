"""Reproduce Table 1 of the paper on real Mixtral-8x7B: WikiText2 perplexity and size for every
(attention, experts) pair of {FP16, 4-bit, 3-bit, 2-bit}.

Needs the 16-bit weights on local disk (~87 GiB) and one GPU with room for them plus one
quantized set of experts (~115 GiB peak: an H100/H200 80+ GB is NOT enough; an H200 141 GB is),
and the WikiText2 test split: either a text file (wiki.test.raw of wikitext-2-raw-v1) or the
`datasets` package with the dataset in its cache.

    python benchmarks/table1_mixtral.py --model /path/to/Mixtral-8x7B-v0.1 \\
        --wikitext /path/to/wiki.test.raw --max-windows 40 --out table1.md

Protocol (GPTQ's, which the paper's numbers follow): the test split joined with "\\n\\n",
tokenized once, cut in consecutive 2048-token windows, each scored on its own. --max-windows
trades accuracy for time (the full split is ~160 windows; 16 pairs x 160 windows is hours).

Reference: Eliseev & Mazur, arXiv 2312.17238, Table 1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_colab.checkpoint import resolve
from moe_colab.quant.perplexity import BITS, perplexity_table, table_markdown

# Table 1, WikiText2 column (Mixtral-8x7B base), keyed by (attention bits, expert bits)
PAPER_WIKI2 = {
    (16, 16): 3.59, (16, 4): 3.67, (16, 3): 3.96, (16, 2): 4.52,
    (4, 16): 3.68, (4, 4): 3.76, (4, 3): 4.05, (4, 2): 4.61,
    (3, 16): 3.99, (3, 4): 4.06, (3, 3): 4.34, (3, 2): 4.90,
    (2, 16): 4.98, (2, 4): 5.08, (2, 3): 5.36, (2, 2): 5.97,
}


def wikitext2_text(path: str | None) -> str:
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=False)
        return "\n\n".join(lines)
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("give --wikitext PATH (wiki.test.raw), or install `datasets` with wikitext cached")
    return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mixtral-8x7b", help="local directory or Hub id (16-bit weights)")
    p.add_argument("--wikitext", default=None, help="wiki.test.raw of wikitext-2-raw-v1")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--bits", default="16,4,3,2", help="bit widths to combine, e.g. 16,2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the markdown table (and a .json) here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU with ~115 GiB free")
    from transformers import AutoTokenizer, MixtralForCausalLM

    path = resolve(a.model)
    tokens = AutoTokenizer.from_pretrained(str(path))(wikitext2_text(a.wikitext), return_tensors="pt").input_ids[0]
    print(f"WikiText2 test: {tokens.numel()} tokens, {tokens.numel() // a.seq_len} windows of {a.seq_len}")
    t0 = time.time()
    model = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float16, device_map=a.device).eval()
    print(f"loaded in {time.time() - t0:.0f} s")
    bits = tuple(int(b) for b in a.bits.split(","))
    assert set(bits) <= set(BITS), f"bits must be among {BITS}"
    results = perplexity_table(model, tokens, bits=bits, seq_len=a.seq_len, max_windows=a.max_windows,
                               device=a.device)
    table = table_markdown(results, model.config, PAPER_WIKI2)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(
            {f"{k[0]},{k[1]}": v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
