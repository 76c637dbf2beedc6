"""Command line: ``python -m moe_colab generate | quantize | plan | verify | bench ...``.

    python -m moe_colab generate --model tiny --prompt "def fibonacci(n):" --max-new-tokens 48
    python -m moe_colab quantize SRC DST --quant paper-2bit
    python -m moe_colab plan mixtral-8x7b --quant paper-2bit --device-bytes 15GiB --host-bytes 12.7GB
    python -m moe_colab verify DST
    python -m moe_colab bench --help

A user error (a bad path, flag, file or budget) prints one line and exits 2; MOE_COLAB_DEBUG=1
shows the Python traceback instead. Ctrl-C stops generation, prints the statistics so far and
exits 130. `plan` exits 1 when nothing fits, `verify` when a file does not match its manifest.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

DTYPES = ("float16", "bfloat16", "float32")
EXIT_USAGE, EXIT_FOUND, EXIT_INTERRUPT = 2, 1, 130
# Exceptions that mean "the input is wrong" (bad path, file, flag, budget, no GPU), not a bug.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def pick_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str):
    import torch
    if name == "auto":
        # fp16 on any GPU (a T4 has no bf16); fp32 on CPU, where half precision is slow.
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def format_stats(stats: dict) -> str:
    uses = stats["hits"] + stats["misses"]
    ratio = stats["hits"] / uses if uses else 0.0
    rows = [("expert uses", uses), ("hits", stats["hits"]), ("misses", stats["misses"]),
            ("hit ratio", f"{ratio:.3f}"), ("prefetches", stats["prefetches"]),
            ("prefetch hits", stats["prefetch_hits"]), ("prefetches wasted", stats["prefetch_wasted"]),
            ("MiB to device", f"{stats['bytes_to_device'] / 2**20:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# -- generate ----------------------------------------------------------------------------------
def check_sampling(args) -> bool:
    """Validate the sampling flags as transformers validates them (its own warpers raise), before
    anything loads. Returns whether to sample (--temperature 0 means greedy)."""
    from transformers import GenerationConfig
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    try:
        GenerationConfig(max_new_tokens=args.max_new_tokens).validate(strict=True)
    except ValueError as e:
        raise ValueError(f"--max-new-tokens: {e}") from None
    if args.temperature == 0:
        return False
    try:
        TemperatureLogitsWarper(args.temperature)     # negative or nan: transformers' own refusal
    except ValueError as e:
        raise ValueError(f"--temperature {args.temperature}: {e} (0 means greedy)") from None
    if not math.isfinite(args.top_p):                 # the warper lets nan through
        raise ValueError(f"--top-p {args.top_p}: `top_p` has to be a float > 0 and <= 1")
    try:
        TopPLogitsWarper(args.top_p)
    except ValueError as e:
        raise ValueError(f"--top-p {args.top_p}: {e}") from None
    return True


def _counting_streamer(tokenizer, skip_prompt: bool):
    """transformers' TextStreamer that also counts the new tokens (for an interrupted run)."""
    from transformers import TextStreamer

    class CountingStreamer(TextStreamer):
        new_tokens = 0
        _prompt_seen = False

        def put(self, value):
            if self._prompt_seen:               # generate puts the prompt first, then each token
                self.new_tokens += value.shape[-1] if value.dim() > 1 else value.numel()
            self._prompt_seen = True
            super().put(value)

    return CountingStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)


def preflight(directory) -> None:
    """The checkpoint's small JSON files, read before the tokenizer (whose own errors would
    hide what is wrong) and before any weight; load_model checks them again, and the rest."""
    from .checkpoint import read_config_dict, read_json_file
    from .convert.manifest import is_quantized_dir

    if not is_quantized_dir(directory):
        read_config_dict(directory)
    if (directory / "generation_config.json").is_file():
        read_json_file(directory / "generation_config.json", "generation settings")


def load_tokenizer(directory):
    from transformers import AutoTokenizer

    source = tokenizer_source(directory)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load a tokenizer from {source} (tokenizer.json, tokenizer.model or "
                         f"tokenizer_config.json): {first}") from e


def cmd_generate(args) -> int:
    import torch

    from .checkpoint import resolve
    from .model import load_model

    sample = check_sampling(args)
    quant = parse_quant(args.quant)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    directory = resolve(args.model)
    preflight(directory)
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, device=device, dtype=dtype, experts_on_device=args.experts_on_device,
                       prefetch=args.prefetch, quant=quant, swap=args.swap or None)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(device)
    streamer = _counting_streamer(tokenizer, skip_prompt=args.chat)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    interrupted = False
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       do_sample=sample, temperature=args.temperature if sample else None,
                       top_p=args.top_p if sample else None, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    except KeyboardInterrupt:           # Ctrl-C: the model stays usable (tests/test_faults.py)
        interrupted = True
        streamer.end()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = streamer.new_tokens
    what = "interrupted after " if interrupted else ""
    print(f"\n\n{what}{new} tokens in {elapsed:.2f} s: {new / max(elapsed, 1e-9):.2f} tokens/s "
          f"({device}, {str(dtype)[6:]}, experts_on_device={model.offload_options.experts_on_device}"
          f"{' (swap mode)' if model.offload_options.swap else ''}, prefetch={args.prefetch})")
    print("expert cache:")
    print(format_stats(model.offload_stats()), flush=True)
    return EXIT_INTERRUPT if interrupted else 0


def parse_quant(text):
    """--quant: None or a 'no quantization' spelling -> None; else a preset or 'ATTN,EXPERT'."""
    if text is None:
        return None
    from .quant.config import resolve_quant
    if "," not in text and resolve_quant(text) is None:      # "none", "fp16", "16-bit"
        return None
    from .convert.quantize import parse_quant_arg
    return parse_quant_arg(text)


def tokenizer_source(directory):
    """A quantized directory may hold no tokenizer: then use the checkpoint it was made from."""
    from .checkpoint import resolve
    from .convert.manifest import MANIFEST, read_manifest

    has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                            "tokenizer_config.json"))
    if has_tokenizer or not (directory / MANIFEST).is_file():
        return directory
    return resolve(read_manifest(directory)["source"])


# -- quantize, plan, verify ----------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from .convert.quantize import main_quantize

    return main_quantize(args)


def cmd_plan(args) -> int:
    from .memory import parse_bytes
    from .planner import PlanError, plan

    def budget(flag, value, env):
        try:
            return parse_bytes(value if value is not None else os.environ.get(env))
        except ValueError as e:
            raise ValueError(f"{flag if value is not None else '$' + env}: {e}") from None

    device_bytes = budget("--device-bytes", args.device_bytes, "MOE_COLAB_DEVICE_BYTES")
    host_bytes = budget("--host-bytes", args.host_bytes, "MOE_COLAB_HOST_BYTES")
    import torch
    device = None if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype)
    k = None if args.experts_on_device == "auto" else args.experts_on_device
    try:
        p = plan(args.model, parse_quant(args.quant), device_bytes, host_bytes, args.max_context, device=device,
                 dtype=dtype, experts_on_device=k, swap=True if args.swap else None)
    except PlanError as e:
        print(e)
        return EXIT_FOUND
    print(p)
    kw = p.load_kwargs()
    print(f"load with: moe_colab.load_model({args.model!r}, quant={kw['quant']!r}, "
          f"experts_on_device={kw['experts_on_device']}, swap={kw['swap']})")
    return 0


def cmd_verify(args) -> int:
    from .convert.manifest import MANIFEST, check_directory
    from .quant.config import PRESETS, QuantConfig

    manifest, problems = check_directory(args.directory)
    files = len(manifest["files"])
    if not problems:
        print(f"{args.directory}: {files} files match {MANIFEST} (size, tensors, sha256); "
              f"{manifest['scheme_name']}, made from {manifest['source']}")
        return 0
    for problem in problems:
        print(f"  {problem}")
    qcfg = QuantConfig.from_dict(manifest["scheme"])
    bits = f"{qcfg.attn_bits},{qcfg.expert_bits}"
    spelling = qcfg.name if qcfg.name in PRESETS else bits if QuantConfig(qcfg.attn_bits, qcfg.expert_bits) == qcfg \
        else None
    redo = (f"python -m moe_colab quantize {manifest['source']} {args.directory} --quant {spelling}" if spelling
            else f"moe_colab.quantize({manifest['source']!r}, {str(args.directory)!r}, "
                 f"quant=moe_colab.QuantConfig(**{manifest['scheme']!r}))")
    print(f"{args.directory}: {len(problems)} problem(s) of {files} files. To redo only those: {redo}")
    return EXIT_FOUND


# -- the parser ----------------------------------------------------------------------------------
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
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1] (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="quantize a checkpoint once, shard by shard (resumable)")
    from .convert.quantize import add_quantize_arguments
    add_quantize_arguments(q)
    q.set_defaults(func=cmd_quantize)

    pl = sub.add_parser("plan", help="how many experts per layer fit: the memory plan, before anything loads")
    pl.add_argument("model", help="preset (mixtral-8x7b, tiny), checkpoint or quantized directory, or Hub id")
    pl.add_argument("--quant", default=None, help="none (default), paper-2bit, paper-3bit or ATTN,EXPERT bits")
    pl.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when --device-bytes is given or CUDA is here (plan a T4 from a laptop)")
    pl.add_argument("--dtype", default="float16", choices=DTYPES)
    pl.add_argument("--device-bytes", default=None, help="GPU budget, e.g. 15GiB (default: "
                    "$MOE_COLAB_DEVICE_BYTES, else measured)")
    pl.add_argument("--host-bytes", default=None, help="host budget, e.g. 12.7GB (default: "
                    "$MOE_COLAB_HOST_BYTES, else measured)")
    pl.add_argument("--max-context", type=int, default=4096, help="tokens of KV cache to plan for")
    pl.add_argument("--experts-on-device", type=_count_or_auto, default="auto", help="a fixed count to check")
    pl.add_argument("--swap", action="store_true", help="plan swap mode only")
    pl.set_defaults(func=cmd_plan)

    v = sub.add_parser("verify", help="check a quantized directory against its manifest (sha256 of every file)")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)

    # `bench` is dispatched in main() before parsing; listed here for --help.
    sub.add_parser("bench", help="benchmark offloading on the GPU (python -m moe_colab bench --help)",
                   add_help=False)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):              # KeyError's str is the repr of the key
        text = f"KeyError: {text}"
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("MOE_COLAB_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        if argv[:1] == ["bench"]:
            # argparse's REMAINDER refuses options that start with "--": hand them over whole.
            from .bench.run import main as bench_main
            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)      # a bad flag: argparse's usage line, exit 2
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:                            # a bug, not the input: still no wall of text
        if debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (this looks like a bug in moe_colab; "
              f"MOE_COLAB_DEBUG=1 shows where)", file=sys.stderr)
        return EXIT_FOUND


if __name__ == "__main__":
    sys.exit(main())
