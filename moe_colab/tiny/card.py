"""The model card (README.md) of the built-in ``tiny`` model, written from its training metrics.

    python -m moe_colab.tiny.card docs/tiny_training.json moe_colab/tiny/weights docs/tiny_model.md

``tiny/train.py`` calls ``write_model_card`` at the end of a run, so every figure in the card is
the one the run measured. Format: Hugging Face model cards (YAML front matter, then Markdown).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def loss_table(metrics: dict) -> str:
    """Markdown table of the loss curve: train loss (mean since the previous row) and held-out loss."""
    heldout = {h["step"]: h for h in metrics["history"]["heldout"]}
    lines = ["| step | minutes | train loss | balance loss | held-out loss | held-out perplexity | busiest expert |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in metrics["history"]["train"]:
        h = heldout.get(t["step"])
        held = f"{h['loss']:.3f} | {h['perplexity']:.1f} | {h.get('max_expert_share', float('nan')):.2f}" \
            if h else "- | - | -"
        balance = t.get("balance", float("nan"))
        lines.append(f"| {t['step']} | {t['minutes']:.1f} | {t['loss']:.3f} | {balance:.3f} | {held} |")
    return "\n".join(lines)


def expert_load_table(metrics: dict) -> str:
    """Markdown table: share of top-2 assignments per expert, one row per layer."""
    loads = metrics["expert_load"]
    n = len(loads[0])
    lines = ["| layer | " + " | ".join(f"e{i}" for i in range(n)) + " |", "|---" * (n + 1) + "|"]
    for layer, load in enumerate(loads):
        lines.append(f"| {layer} | " + " | ".join(f"{x:.2f}" for x in load) + " |")
    return "\n".join(lines)


def model_card(metrics: dict) -> str:
    c, m = metrics["config"], metrics
    files, tokens = m["files"], m["tokens"]
    stop = " (stopped by --max-minutes)" if m["stopped_early"] else ""
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, tiny, python-code]
---
# tiny: a small Mixtral trained on the Python standard library

The built-in default model of `moe_colab` (`load_model("tiny")`). It has Mixtral's architecture
(8 experts per layer, top-2 routing, grouped-query attention) at a size that trains on one CPU core
in half an hour, so every notebook and test can run the offloading engine on a model whose
routing was actually learned rather than random. It completes Python code, badly: it is a teaching
model, not a useful one.

## Corpus and split
- The `.py` files of Python {m['python']}'s standard library, read offline from the machine that
  trained it. Skipped: site-packages, test directories (`test`, `tests`, `idle_test`) and the
  data-table packages `encodings` and `pydoc_data`.
- Held-out split: a file is held out when the first 8 hex digits of the SHA-256 of its path
  (relative to the stdlib root) are 0..19 modulo 1000, i.e. about 2% of files:
  {files['train']} train files ({tokens['train']:,} tokens), {files['heldout']} held-out files
  ({tokens['heldout']:,} tokens). Held-out files: {', '.join(files['heldout_paths'])}.

## Tokenizer
Byte-level BPE trained with `tokenizers` on the train split only: vocabulary {c['vocab_size']},
special tokens `<unk>`=0, `<s>`=1 (prepended by the tokenizer), `</s>`=2, `<pad>`=3. It round-trips
any text exactly; {tokens['chars_per_token']:.2f} characters per token on the train split.

## Model
`MixtralConfig`: {c['num_hidden_layers']} layers, hidden size {c['hidden_size']}, expert intermediate
size {c['intermediate_size']}, {c['num_local_experts']} experts with top-{c['num_experts_per_tok']} routing,
{c['num_attention_heads']} attention heads with {c['num_key_value_heads']} key/value heads, context
{c['seq_len']}, untied embeddings; {m['parameters']:,} parameters, stored in float16
({m['size_on_disk_bytes'] / 1e6:.1f} MB on disk with the tokenizer).

## Training
AdamW (betas 0.9/0.95, weight decay 0.1, gradient clipping 1.0), peak learning rate {c['lr']},
{c['warmup']} warmup steps then cosine decay to 10%, batch {c['batch_size']} x {c['seq_len']} tokens
of random windows from the train stream. Load balancing: Switch Transformer's loss computed for
each layer on its own and averaged (1.0 = perfectly balanced), weight {c['router_aux_loss_coef']};
transformers' built-in `aux_loss` pools all layers' counts, which let most layers collapse onto
two or three experts in a first run.
Seed {m['seed']}; {m['steps']} steps{stop}, {m['tokens_seen']:,} tokens seen, {m['train_minutes']:.1f} min of
training ({m['total_minutes']:.1f} min in all, tokenizer included) on one CPU thread.

## Results
| | value |
|---|---:|
| final train loss (mean of the last steps) | {m['final_train_loss'] or float('nan'):.3f} |
| held-out loss (all held-out tokens, shipped float16 weights) | {m['heldout_loss']:.3f} |
| held-out perplexity | {m['heldout_perplexity']:.1f} |
| uniform predictor, log(vocab) | {m['uniform_loss']:.3f} |

Loss curve: train loss and balance loss are means since the previous row; held-out loss on the
first {c['eval_tokens']:,} held-out tokens; busiest expert = the largest share of top-2 assignments
any expert of any layer gets (0.125 is perfect balance, 0.5 means every token picks it).

{loss_table(m)}

Expert load of the shipped model on 32 windows spread over the held-out split (share of top-2
assignments; 0.125 each would be perfect balance):

{expert_load_table(m)}

## Use
```python
from transformers import AutoTokenizer, MixtralForCausalLM
from moe_colab.checkpoint import builtin_model_path
path = builtin_model_path("tiny")
model = MixtralForCausalLM.from_pretrained(path, dtype="float32")
tok = AutoTokenizer.from_pretrained(path)
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

## Retrain
`python -m moe_colab.tiny.train --out moe_colab/tiny/weights --metrics docs/tiny_training.json`
(seeded; `--threads N` for more cores, `--max-minutes` to stop early and still save, `--resume` to
continue from the last checkpoint in `tmp/train_tiny/`). A different Python version has a different
standard library, so the figures will move a little.
"""


def docs_page(metrics: dict) -> str:
    """docs/tiny_model.md: the card's figures, for readers of the repository rather than the Hub."""
    body = model_card(metrics).split("---\n", 2)[2]            # drop the YAML front matter
    body = body.replace("# tiny: a small Mixtral", "# The built-in model `tiny`: a small Mixtral", 1)
    return body + f"""
## How the tests hold it to these figures
`tests/test_tiny_model.py` loads the shipped directory with plain transformers, checks that the
tokenizer round-trips Python source, recomputes the loss on a fixed probe (the first
{metrics['heldout_probe']['tokens']} tokens of {metrics['heldout_probe']['files']} held-out files; recorded
here as {metrics['heldout_probe']['loss']:.3f}) and compares it with `docs/tiny_training.json`, checks that
greedy generation from `def ` looks like Python and that every layer routes to more than two
experts, and runs the training script end to end in a toy setting (`--tiny-test`).
The metrics of this run, loss curve included, are in `docs/tiny_training.json`.
"""


def write_model_card(out_dir: Path, metrics: dict) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(model_card(metrics))
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m moe_colab.tiny.card METRICS.json MODEL_DIR [DOCS.md]")
    metrics = json.loads(Path(sys.argv[1]).read_text())
    write_model_card(Path(sys.argv[2]), metrics)
    if len(sys.argv) == 4:
        Path(sys.argv[3]).write_text(docs_page(metrics))
