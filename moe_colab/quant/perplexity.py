"""Perplexity of a model on a token stream, and Table 1's grid: every (attention, experts) pair.

    perplexity(model, tokens, seq_len=2048)         exp(mean next-token NLL), non-overlapping windows
    perplexity_table(model, tokens)                 {(attn_bits, expert_bits): ppl} for bits in
                                                    16, 4, 3, 2, by swapping quantized modules in
                                                    and out of ONE model (each part quantized once)

    python -m moe_colab.quant.perplexity --model tiny --table            (text: --text FILE, else a
    python -m moe_colab.quant.perplexity --model DIR --quant paper-2bit   sample of the 16-bit model)

The windows follow the usual WikiText2 protocol (GPTQ and the paper's Table 1): the token stream is
cut into consecutive seq_len windows and every window is scored on its own. Without a text file,
the stream is sampled from the 16-bit model itself, so the table measures how far each scheme
drifts from the original model even for an untrained checkpoint.

Reference: Eliseev & Mazur, arXiv 2312.17238, Table 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..adapters.mixtral import MixtralAdapter as A
from .config import QuantConfig
from .experts import QuantizedExperts
from .format import ATTN_PROJ, QuantLinear

BITS = (16, 4, 3, 2)


@torch.no_grad()
def perplexity(model, tokens, *, seq_len: int = 2048, batch_size: int = 1, max_windows: int | None = None,
               progress: bool = False) -> float:
    """exp(mean NLL) of ``tokens`` (1-D) under ``model`` in consecutive windows of ``seq_len``."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    seq_len = min(seq_len, tokens.numel())
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    windows = tokens[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    from tqdm.auto import tqdm
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)                  # [B, L]
        logits = model(ids).logits[:, :-1].float()                            # [B, L-1, V]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def _attention(model):
    return [layer.self_attn for layer in A.decoder_layers(model)]


@torch.no_grad()
def perplexity_table(model, tokens, *, bits=BITS, seq_len: int = 2048, batch_size: int = 1,
                     max_windows: int | None = None, device=None, progress: bool = True,
                     groups: dict | None = None) -> dict[tuple[int, int], float]:
    """{(attn_bits, expert_bits): perplexity} for every pair of ``bits`` (default 16, 4, 3, 2).

    Memory: the 16-bit model, every attention variant (small) and ONE quantized set of experts at
    a time. The model is restored to 16 bits at the end. ``groups``: optional {bits: (group_size,
    scale_group)} overriding the paper's settings.
    """
    groups = groups or {}

    def qcfg(a, e):
        kw = {}
        if a != 16 and a in groups:
            kw.update(attn_group_size=groups[a][0], attn_scale_group=groups[a][1])
        if e != 16 and e in groups:
            kw.update(expert_group_size=groups[e][0], expert_scale_group=groups[e][1])
        return QuantConfig(a, e, **kw)

    attn_orig = [{p: getattr(m, p) for p in ATTN_PROJ} for m in _attention(model)]
    blocks = [A.moe_block(layer) for layer in A.decoder_layers(model)]
    experts_orig = [b.experts for b in blocks]
    attn_variants = {16: attn_orig}
    for a in bits:
        if a != 16:
            _, g, sg = qcfg(a, 16).matrix("attn")
            attn_variants[a] = [{p: QuantLinear.from_linear(mods[p], a, g, sg, device) for p in ATTN_PROJ}
                                for mods in attn_orig]
    results = {}
    try:
        for e in bits:
            if e == 16:
                experts = experts_orig
            else:
                experts = [QuantizedExperts.from_experts(x, model.config, qcfg(16, e), device) for x in experts_orig]
            for b, x in zip(blocks, experts):
                b.experts = x
            for a in bits:
                for m, mods in zip(_attention(model), attn_variants[a]):
                    for p, mod in mods.items():
                        setattr(m, p, mod)
                results[(a, e)] = perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size,
                                             max_windows=max_windows)
                if progress:
                    print(f"attention {a:>2}-bit, experts {e:>2}-bit: perplexity {results[(a, e)]:.4f}", flush=True)
            del experts
    finally:
        for b, x in zip(blocks, experts_orig):
            b.experts = x
        for m, mods in zip(_attention(model), attn_orig):
            for p, mod in mods.items():
                setattr(m, p, mod)
    return results


def table_markdown(results: dict, config=None, paper: dict | None = None) -> str:
    """Perplexities as a markdown table in the paper's row order, with our size when ``config`` is
    given (GiB, or MiB for small models) and the paper's perplexity column when ``paper`` is."""
    from .size import estimate_size
    name = lambda b: "FP16" if b == 16 else f"{b}-bit"
    unit, scale = ("GiB", 2**30) if config is not None and estimate_size(config) >= 2**30 else ("MiB", 2**20)
    cols = ["Attn", "Experts", "perplexity"] + ([f"size {unit}"] if config is not None else []) + \
           (["paper"] if paper else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (a, e), ppl in sorted(results.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        row = [name(a), name(e), f"{ppl:.4f}"]
        if config is not None:
            row.append(f"{estimate_size(config, QuantConfig(a, e)) / scale:.3f}")
        if paper:
            row.append(f"{paper.get((a, e), float('nan')):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@torch.no_grad()
def sample_tokens(model, n: int, *, seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """n tokens sampled from ``model`` (temperature 1, KV cache), for a stream when no text is given;
    each chunk continues from the last half of the previous one."""
    device = next(model.parameters()).device
    chunk = min(chunk, getattr(model.config, "max_position_embeddings", chunk))
    start = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    out = torch.tensor([start])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while out.numel() < n:
            ctx = out[-(chunk // 2):].to(device)[None]
            steps = min(chunk - ctx.shape[1], n - out.numel())
            gen = model.generate(ctx, max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, pad_token_id=start)
            out = torch.cat([out, gen[0, ctx.shape[1]:].cpu()])
    return out[:n]


def main(argv=None) -> int:
    import argparse

    from ..checkpoint import resolve
    from .config import resolve_quant
    from .experts import quantize_model_
    p = argparse.ArgumentParser(prog="python -m moe_colab.quant.perplexity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="checkpoint directory, 'tiny' or Hub id")
    p.add_argument("--table", action="store_true", help="all 16 (attention, experts) pairs")
    p.add_argument("--quant", default=None, help="one scheme (preset name) when not --table")
    p.add_argument("--text", default=None, help="UTF-8 text file, tokenized with the model's tokenizer")
    p.add_argument("--tokens", type=int, default=4096, help="stream length sampled from the model without --text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    path = resolve(a.model)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else torch.float16)
    model = A.model_class().from_pretrained(str(path), dtype=dtype).to(a.device).eval()
    if a.text:
        from transformers import AutoTokenizer
        tokens = AutoTokenizer.from_pretrained(str(path))(open(a.text, encoding="utf-8").read(),
                                                          return_tensors="pt").input_ids[0]
    else:
        tokens = sample_tokens(model, a.tokens)
        print(f"no --text: scoring {len(tokens)} tokens sampled from the 16-bit model")
    kw = dict(seq_len=a.seq_len, max_windows=a.max_windows)
    if a.table:
        print(table_markdown(perplexity_table(model, tokens, **kw), model.config))
    else:
        quantize_model_(model, resolve_quant(a.quant))
        print(f"perplexity ({a.quant or '16-bit'}): {perplexity(model, tokens, **kw):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
