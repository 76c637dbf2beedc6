"""The data of the built-in ``tiny`` model: the Python stdlib as a corpus, its split, its tokenizer.

Every machine already holds the corpus: the ``.py`` files of the running Python's standard library
(site-packages, test directories and two data-table packages left out). A file belongs to the
held-out split when the hash of its relative path falls in the lowest 2%, so the split does not
depend on the order of a directory listing or on other files. The tokenizer is byte-level BPE
(``tokenizers``, as in GPT-2) trained on the train split only; it round-trips any text exactly.

Used by ``tiny/train.py`` (training) and ``tests/test_tiny_model.py`` (re-measuring the shipped model).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]   # ids 0..3, as in Mixtral: unk=0, bos=1, eos=2
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
HELDOUT_PER_MILLE = 20                               # 2% of files
# Directories that are not ordinary code: tests, and tables of data (codecs, pydoc topics).
SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}


# -- corpus --------------------------------------------------------------------------------------
def is_heldout(relative_path: str) -> bool:
    """Whether a stdlib file (posix path relative to the stdlib root) is in the held-out split."""
    digest = hashlib.sha256(relative_path.encode()).hexdigest()
    return int(digest[:8], 16) % 1000 < HELDOUT_PER_MILLE


def stdlib_files(root: str | Path | None = None) -> tuple[list[Path], list[Path], Path]:
    """(train files, held-out files, stdlib root), both lists sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root}")
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]    # prune: never walk site-packages
        found += [Path(directory, n) for n in names if n.endswith(".py")]
    train, heldout = [], []
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        (heldout if is_heldout(path.relative_to(root).as_posix()) else train).append(path)
    return train, heldout, root


def read_sources(paths: list[Path]) -> list[str]:
    """File contents; files that are not UTF-8 are skipped (there are almost none)."""
    texts = []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    return texts


# -- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizers.Tokenizer that prepends <s>; it can encode any byte string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # keep source text exact
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS_ID)])
    return tok


def hf_tokenizer(tok, seq_len: int):
    """Wrap for save_pretrained / AutoTokenizer, special tokens named."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=seq_len)


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """One long int32 stream: <s> file </s> <s> file </s> ..."""
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    ids = []
    for e in encodings:
        ids += [BOS_ID, *e.ids, EOS_ID]
    return torch.tensor(ids, dtype=torch.int32)


def heldout_probe(tokenizer, texts: list[str], n_files: int = 4, tokens: int = 128) -> torch.Tensor:
    """[n, tokens] ids: <s> and the start of the first held-out files; a quick, fixed measurement."""
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=tokens)["input_ids"]
        if len(ids) == tokens:
            rows.append(ids)
        if len(rows) == n_files:
            break
    return torch.tensor(rows, dtype=torch.long)


# -- batches -------------------------------------------------------------------------------------
def batch_at(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[B, T+1] random windows; a function of (seed, step) only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()


def spread_rows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """[n, T] windows spread evenly over a stream (many files, not just the first)."""
    starts = torch.linspace(0, len(stream) - seq_len, n).long().tolist()
    return torch.stack([stream[s:s + seq_len] for s in starts]).long()
