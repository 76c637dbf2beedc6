"""Train ``tiny``, the small Mixtral shipped inside the package, on CPU from the Python stdlib.

    python -m moe_colab.tiny.train --out moe_colab/tiny/weights --metrics docs/tiny_training.json

The corpus is the running Python's own standard library, split and tokenized by ``tiny_data.py``
(byte-level BPE trained on the train split only). The model is a transformers ``MixtralConfig``:
8 experts, top-2 routing, grouped-query attention, trained with a per-layer load-balancing loss
so every expert of every layer gets work; the offloading engine then has something real to cache.
Weights are saved in float16.

Training is seeded and its data order is a function of (seed, step) alone, so ``--resume``
continues exactly where a checkpoint left off. ``--max-minutes`` stops cleanly and still saves.

References: Mixtral (arXiv 2401.04088), load-balancing loss (Switch Transformer, arXiv 2101.03961),
nanoGPT's train.py for the shape of the loop; the paper this package follows: arXiv 2312.17238.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import (BOS_ID, EOS_ID, PAD_ID, batch_at, encode_stream, heldout_probe, hf_tokenizer,
                        read_sources, spread_rows, stdlib_files, train_tokenizer)

# name: (model shape, training schedule). "full" is what ships; "tiny-test" keeps the script honest.
SETTINGS = {
    "full": dict(vocab_size=4096, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, seq_len=256, batch_size=8,
                 steps=2000, warmup=50, lr=2e-3, eval_every=200, eval_tokens=8192, final_eval_tokens=10 ** 9,
                 max_files=None),
    "tiny-test": dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, seq_len=32, batch_size=2,
                      steps=3, warmup=1, lr=1e-3, eval_every=2, eval_tokens=256, final_eval_tokens=1024,
                      max_files=12),
}


# -- model and loss -------------------------------------------------------------------------------
def model_config(s: dict, aux_coef: float):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=s["seq_len"], rope_theta=10000.0, rms_norm_eps=1e-5,
        router_aux_loss_coef=aux_coef, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def lr_at(step: int, steps: int, warmup: int, peak: float, floor_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to floor_frac * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def loss_on_rows(model, rows: torch.Tensor) -> float:
    """Mean next-token loss (nats) of rows [n, T+1], 8 rows per forward."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8].long()
        logits = model(input_ids=chunk[:, :-1]).logits              # [b, T, V]
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / rows[:, 1:].numel()


def evaluate(model, stream: torch.Tensor, seq_len: int, max_tokens: int) -> float:
    """Mean loss over consecutive non-overlapping windows of a stream (at most max_tokens)."""
    n = min(len(stream) - 1, max_tokens) // seq_len
    rows = torch.stack([stream[j * seq_len: (j + 1) * seq_len + 1] for j in range(n)])  # [n, T+1]
    return loss_on_rows(model, rows)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss, per layer, averaged over layers; 1.0 when balanced.

    transformers' own aux_loss pools the counts of all layers before multiplying, so expert 7 of a
    layer that sends it every token is "balanced" by expert 7 of a layer that never does; in our
    runs that let most layers collapse onto 2-3 experts. Each layer is balanced on its own here.
    """
    losses = []
    for logits in router_logits:                                    # [tokens, E] per layer
        probs = logits.float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices                  # [tokens, k]
        share = F.one_hot(chosen, probs.shape[-1]).float().mean(dim=(0, 1))   # [E], sums to 1
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_load(model, input_ids: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of top-k assignments each expert receives on these tokens."""
    was_training = model.training
    model.eval()                                                    # route as at inference
    out = model(input_ids=input_ids, output_router_logits=True)
    model.train(was_training)
    k, e = model.config.num_experts_per_tok, model.config.num_local_experts
    loads = []
    for logits in out.router_logits:                                # [tokens, E] per layer
        chosen = logits.float().topk(k, dim=-1).indices.flatten()
        loads.append((torch.bincount(chosen, minlength=e).float() / chosen.numel()).tolist())
    return loads


# -- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights",
                    help="where the Hugging Face model directory is written")
    ap.add_argument("--work-dir", type=Path, default=Path("tmp/train_tiny"),
                    help="checkpoints and the tokenizer for --resume")
    ap.add_argument("--metrics", type=Path, default=None, help="also write the metrics JSON here")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the setting's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--aux-coef", type=float, default=0.05, help="per-layer load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the build machine is shared)")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="stop training cleanly after this long")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from --work-dir/state.pt")
    ap.add_argument("--tiny-test", action="store_true", help="a toy run of a few seconds, for tests")
    ap.add_argument("--stdlib", type=Path, default=None, help="stdlib directory (default: this Python's)")
    args = ap.parse_args(argv)

    s = dict(SETTINGS["tiny-test" if args.tiny_test else "full"])
    s["steps"] = args.steps if args.steps is not None else s["steps"]
    s["batch_size"] = args.batch_size or s["batch_size"]
    if s["steps"] < 1:
        raise ValueError(f"--steps must be at least 1, got {s['steps']}")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))   # tokenizers' thread pool
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, MixtralForCausalLM
    from tokenizers import Tokenizer

    t_start = time.time()
    train_files, heldout_files, root = stdlib_files(args.stdlib)
    if s["max_files"]:
        train_files, heldout_files = train_files[: s["max_files"]], heldout_files[:3]
    train_texts, heldout_texts = read_sources(train_files), read_sources(heldout_files)
    print(f"corpus: {len(train_texts)} train / {len(heldout_texts)} held-out files from {root}")

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    state_path, tok_path = work / "state.pt", work / "tokenizer.json"
    if args.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {state_path} (train without --resume first)")
    state = torch.load(state_path, weights_only=False) if args.resume else None   # our own file
    tok = Tokenizer.from_file(str(tok_path)) if state else train_tokenizer(train_texts, s["vocab_size"])
    tok.save(str(tok_path))
    train_stream, heldout_stream = encode_stream(tok, train_texts), encode_stream(tok, heldout_texts)
    print(f"tokens: {len(train_stream):,} train / {len(heldout_stream):,} held-out, "
          f"{sum(map(len, train_texts)) / len(train_stream):.2f} characters per token")

    config = model_config(s, args.aux_coef)
    model = MixtralForCausalLM(config)                      # float32 master weights for training
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=s["lr"], betas=(0.9, 0.95))
    step, elapsed, history = 0, 0.0, {"train": [], "heldout": []}
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min already trained)")

    def save_state():
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "history": history, "setting": s}, state_path)

    model.train()
    coef, T = config.router_aux_loss_coef, s["seq_len"]
    window_loss, window_balance, window_n, stopped_early = 0.0, 0.0, 0, False
    bar = tqdm(total=s["steps"], initial=step, desc="train tiny", unit="step")
    t_loop = time.time() - elapsed                           # wall clock of step 0, resumes included
    while step < s["steps"]:
        if (time.time() - t_loop) / 60 > args.max_minutes:
            stopped_early = True
            break
        lr = lr_at(step, s["steps"], s["warmup"], s["lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        xy = batch_at(train_stream, step, s["batch_size"], T, args.seed)          # [B, T+1]
        out = model(input_ids=xy[:, :-1], output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), xy[:, 1:].flatten())
        balance = balance_loss(out.router_logits, config.num_experts_per_tok)
        (lm_loss + coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - t_loop
        window_loss, window_n = window_loss + lm_loss.item(), window_n + 1
        window_balance += balance.item()
        bar.update(1)
        bar.set_postfix(loss=f"{lm_loss.item():.3f}", balance=f"{balance.item():.3f}", lr=f"{lr:.1e}")
        if step % s["eval_every"] == 0 or step == s["steps"]:
            history["train"].append({"step": step, "loss": window_loss / window_n,
                                     "balance": window_balance / window_n, "minutes": round(elapsed / 60, 2)})
            window_loss, window_balance, window_n = 0.0, 0.0, 0
            h = evaluate(model, heldout_stream, T, s["eval_tokens"])
            load = torch.tensor(expert_load(model, spread_rows(heldout_stream, T, 8)))      # [layers, E]
            history["heldout"].append({"step": step, "loss": h, "perplexity": math.exp(h),
                                       "max_expert_share": load.max().item(),
                                       "unused_experts": int((load < 0.005).sum())})
            bar.write(f"step {step}: train loss {history['train'][-1]['loss']:.3f}, "
                      f"held-out loss {h:.3f} (perplexity {math.exp(h):.1f}), busiest expert "
                      f"{load.max():.2f} of assignments, {int((load < 0.005).sum())} unused")
        if step % args.checkpoint_every == 0:
            save_state()
    bar.close()
    if window_n:                                              # a partial last window (time limit)
        history["train"].append({"step": step, "loss": window_loss / window_n,
                                 "balance": window_balance / window_n, "minutes": round(elapsed / 60, 2)})
    save_state()

    # Ship float16 weights, then measure what ships: reload it as a user would, in float32.
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out_dir)
    hf_tokenizer(tok, T).save_pretrained(out_dir)
    shipped = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    shipped_tok = AutoTokenizer.from_pretrained(out_dir)
    heldout_loss = evaluate(shipped, heldout_stream, T, s["final_eval_tokens"])
    probe = heldout_probe(shipped_tok, heldout_texts)
    probe_loss = loss_on_rows(shipped, probe) if len(probe) else None
    loads = expert_load(shipped, spread_rows(heldout_stream, T, 32))
    for layer, load in enumerate(loads):
        print(f"layer {layer} expert load: " + " ".join(f"{x:.2f}" for x in load))

    metrics = {
        "python": platform.python_version(), "stdlib": str(root), "seed": args.seed,
        "setting": "tiny-test" if args.tiny_test else "full", "config": {**s, "num_local_experts": 8,
        "num_experts_per_tok": 2, "router_aux_loss_coef": coef},
        "files": {"train": len(train_texts), "heldout": len(heldout_texts),
                  "heldout_paths": [p.relative_to(root).as_posix() for p in heldout_files]},
        "tokens": {"train": len(train_stream), "heldout": len(heldout_stream),
                   "chars_per_token": sum(map(len, train_texts)) / len(train_stream)},
        "parameters": n_params, "size_on_disk_bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
        "steps": step, "stopped_early": stopped_early, "tokens_seen": step * s["batch_size"] * T,
        "train_minutes": round(elapsed / 60, 2), "total_minutes": round((time.time() - t_start) / 60, 2),
        "final_train_loss": history["train"][-1]["loss"] if history["train"] else None,
        "heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss),
        "uniform_loss": math.log(config.vocab_size),
        "heldout_probe": {"files": probe.shape[0], "tokens": probe.shape[1] if probe.dim() == 2 else 0,
                          "loss": probe_loss},
        "expert_load": loads, "history": history,
    }
    (work / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.metrics:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(metrics, indent=1))
    from .card import write_model_card
    write_model_card(out_dir, metrics)
    print(f"saved {out_dir}: {n_params / 1e6:.2f}M parameters, {metrics['size_on_disk_bytes'] / 1e6:.1f} MB, "
          f"{step} steps in {elapsed / 60:.1f} min; train loss {metrics['final_train_loss'] or float('nan'):.3f}, "
          f"held-out loss {heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.1f}; "
          f"uniform {math.log(config.vocab_size):.2f})")
    return metrics


if __name__ == "__main__":
    main()
