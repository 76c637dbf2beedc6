"""Command line: ``python -m moe_colab generate | quantize | bench ...``.

    python -m moe_colab generate --model tiny --prompt "def fibonacci(n):" --max-new-tokens 48
    python -m moe_colab quantize SRC DST --quant paper-2bit
    python -m moe_colab bench --help
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # fp16 on any GPU (a T4 has no bf16); fp32 on CPU, where half precision is slow.
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[name]


def format_stats(stats: dict) -> str:
    uses = stats["hits"] + stats["misses"]
    ratio = stats["hits"] / uses if uses else 0.0
    rows = [("expert uses", uses), ("hits", stats["hits"]), ("misses", stats["misses"]),
            ("hit ratio", f"{ratio:.3f}"), ("prefetches", stats["prefetches"]),
            ("prefetch hits", stats["prefetch_hits"]), ("prefetches wasted", stats["prefetch_wasted"]),
            ("MiB to device", f"{stats['bytes_to_device'] / 2**20:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from .checkpoint import resolve
    from .model import load_model

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    directory = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(directory))
    quant = args.quant
    if quant is not None:
        from .convert.quantize import parse_quant_arg
        quant = parse_quant_arg(quant)
    model = load_model(directory, device=device, dtype=dtype, experts_on_device=args.experts_on_device,
                       prefetch=args.prefetch, quant=quant, swap=args.swap or None)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SystemExit(f"--chat: the tokenizer of {args.model} has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=sample, temperature=args.temperature if sample else None,
                         top_p=args.top_p if sample else None, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(f"\n\n{new} tokens in {elapsed:.2f} s: {new / elapsed:.2f} tokens/s "
          f"({device}, {str(dtype)[6:]}, experts_on_device={model.offload_options.experts_on_device}"
          f"{' (swap mode)' if model.offload_options.swap else ''}, prefetch={args.prefetch})")
    print("expert cache:")
    print(format_stats(model.offload_stats()))
    return 0


def cmd_quantize(args) -> int:
    from .convert.quantize import main_quantize

    return main_quantize(args)


def tokenizer_source(directory):
    """A quantized directory may hold no tokenizer: then use the checkpoint it was made from."""
    from .checkpoint import resolve
    from .convert.manifest import MANIFEST, read_manifest

    has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                            "tokenizer_config.json"))
    if has_tokenizer or not (directory / MANIFEST).is_file():
        return directory
    return resolve(read_manifest(directory)["source"])


def _count_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of experts or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_colab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream text from a model with offloaded experts")
    g.add_argument("--model", default="tiny", help="directory, built-in name (tiny) or Hub id")
    g.add_argument("--prompt", default="def fibonacci(n):")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    g.add_argument("--experts-on-device", type=_count_or_auto, default="auto",
                   help="device slots per layer, or 'auto' (default): the most that fit this machine")
    g.add_argument("--prefetch", type=int, default=2)
    g.add_argument("--quant", default=None,
                   help="quantize while loading: paper-2bit, paper-3bit or ATTN,EXPERT bits such as 4,2 "
                        "(default: none; a directory written by `quantize` needs no flag)")
    g.add_argument("--swap", action="store_true",
                   help="keep each expert on the host or the device, never both (less host memory)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="quantize a checkpoint once, shard by shard (resumable)")
    from .convert.quantize import add_quantize_arguments
    add_quantize_arguments(q)
    q.set_defaults(func=cmd_quantize)

    # `bench` is dispatched in main() before parsing; listed here for --help.
    sub.add_parser("bench", help="benchmark offloading on the GPU (python -m moe_colab bench --help)",
                   add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # argparse's REMAINDER refuses options that start with "--": hand them over whole.
        from .bench.run import main as bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
