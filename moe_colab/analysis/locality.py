"""Locality statistics of a routing trace: why an LRU cache of experts works at all.

    reuse_probability   how often token t+d reuses an expert of token t, per layer, vs chance
    expert_load         fraction of all expert uses that went to each expert, per layer
    token_categories    Python-source category of every model token (keyword, identifier, ...)
    category_expert_counts  [layer, category, expert] table: which kinds of token go where

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.1 ("experts are often reused by
adjacent tokens"); Mixtral of Experts, arXiv 2401.04088, section 5 (routing on code follows
syntax, e.g. indentation and keywords).
"""
from __future__ import annotations

import io
import keyword
import tokenize
from math import comb

import torch

from .routing import RoutingTrace

REUSE_KINDS = ("any", "fraction")
CATEGORIES = ("keyword", "identifier", "number", "string", "comment", "punctuation", "whitespace", "other")


def _usage(trace: RoutingTrace) -> torch.Tensor:
    """bool [layers, tokens, experts]: did token t use expert e at layer l."""
    L, T, _ = trace.experts.shape
    used = torch.zeros(L, T, trace.num_experts, dtype=torch.bool)
    used.scatter_(2, trace.experts, True)
    return used


def chance_reuse(num_experts: int, top_k: int, kind: str = "any") -> float:
    """Reuse probability if every token picked top_k of num_experts uniformly at random.

    "any":       P(two random k-subsets intersect) = 1 - C(E-k, k) / C(E, k)
                 (Mixtral 8 choose 2: 1 - 15/28 = 0.464)
    "fraction":  expected share of token t's experts that token t+d also uses = k / E
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if kind == "any":
        return 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)
    if kind == "fraction":
        return top_k / num_experts
    raise ValueError(f"unknown reuse kind {kind!r}; choose one of {list(REUSE_KINDS)}")


def reuse_probability(trace: RoutingTrace, max_distance: int = 8, kind: str = "any") -> torch.Tensor:
    """float [layers, max_distance]: entry [l, d-1] measures reuse d tokens later at layer l.

    kind="any" (default): the probability that AT LEAST ONE of the top_k experts of token t is
    also among the experts of token t+d, over all t with t+d < tokens.
    kind="fraction": the mean share |S_t & S_t+d| / top_k (what a cache of just the last
    token's experts would hit). Distances with no token pair are NaN.
    Compare with ``chance_reuse(trace.num_experts, trace.top_k, kind)``.
    """
    if kind not in REUSE_KINDS:
        raise ValueError(f"unknown reuse kind {kind!r}; choose one of {list(REUSE_KINDS)}")
    if max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    used = _usage(trace)                                            # [L, T, E]
    out = torch.full((trace.num_layers, max_distance), float("nan"))
    for d in range(1, min(max_distance, trace.num_tokens - 1) + 1):
        shared = (used[:, :-d] & used[:, d:]).sum(-1).float()      # [L, T-d]
        out[:, d - 1] = ((shared > 0).float() if kind == "any" else shared / trace.top_k).mean(1)
    return out


def expert_load(trace: RoutingTrace) -> torch.Tensor:
    """float [layers, experts]: the fraction of the layer's expert uses each expert served."""
    counts = _usage(trace).sum(1).float()                           # [L, E]
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


# -- token kinds ------------------------------------------------------------------------------------
def classify_piece(piece: str) -> str:
    """Category of one token string on its own (no context); SentencePiece's '▁' and byte-BPE's
    'Ġ'/'Ċ' markers count as whitespace."""
    s = piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")
    core = s.strip()
    if not core:
        return "whitespace"
    if keyword.iskeyword(core):
        return "keyword"
    if core.isidentifier():
        return "identifier"
    if core[0].isdigit():
        return "number"
    if core[0] in "'\"":
        return "string"
    if core.startswith("#"):
        return "comment"
    if all(not c.isalnum() and c != "_" for c in core):
        return "punctuation"
    return "other"


def _source_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, category) character spans of Python's own tokens in ``text``."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    to_offset = lambda rc: starts[rc[0] - 1] + rc[1]  # noqa: E731  (1-based row, 0-based col)
    spans = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            a, b = to_offset(tok.start), to_offset(tok.end)
            if tok.type == tokenize.NAME:
                cat = "keyword" if keyword.iskeyword(tok.string) else "identifier"
            elif tok.type == tokenize.NUMBER:
                cat = "number"
            elif tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_START", -1),
                              getattr(tokenize, "FSTRING_MIDDLE", -1), getattr(tokenize, "FSTRING_END", -1)):
                cat = "string"
            elif tok.type == tokenize.COMMENT:
                cat = "comment"
            elif tok.type == tokenize.OP:
                cat = "punctuation"
            else:
                continue          # NEWLINE, INDENT, ...: the gaps between spans are whitespace
            if b > a:
                spans.append((a, b, cat))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass                      # a chunk cut mid-statement: keep the spans read so far
    return spans


def token_categories(text: str, offsets) -> list[str]:
    """Category of each model token, from Python's tokenizer run over the whole ``text``.

    offsets: (start, end) character spans of the model's tokens in ``text`` (a fast tokenizer's
    offset_mapping). A model token takes the category of the Python token under its first
    non-space character; tokens of spaces/newlines only are "whitespace"; characters Python's
    tokenizer did not cover (e.g. after a syntax error) fall back to ``classify_piece``.
    """
    spans = _source_spans(text)
    owner = ["" for _ in range(len(text))]
    for a, b, cat in spans:
        for i in range(a, min(b, len(text))):
            owner[i] = cat
    cats = []
    for a, b in offsets:
        piece = text[a:b]
        first = next((i for i in range(a, b) if not text[i].isspace()), None)
        if first is None:
            cats.append("whitespace")
        else:
            cats.append(owner[first] or classify_piece(piece))
    return cats


def category_expert_counts(trace: RoutingTrace, categories: list[str],
                           names: tuple[str, ...] = CATEGORIES) -> torch.Tensor:
    """LongTensor [layers, len(names), experts]: how often tokens of each category used each expert."""
    if len(categories) != trace.num_tokens:
        raise ValueError(f"{len(categories)} categories for a trace of {trace.num_tokens} tokens")
    unknown = sorted(set(categories) - set(names))
    if unknown:
        raise ValueError(f"categories {unknown} are not in names {list(names)}")
    index = torch.tensor([names.index(c) for c in categories], dtype=torch.long)    # [T]
    onehot = torch.nn.functional.one_hot(index, len(names)).float()                # [T, C]
    used = _usage(trace).float()                                                    # [L, T, E]
    return torch.einsum("tc,lte->lce", onehot, used).round().long()
