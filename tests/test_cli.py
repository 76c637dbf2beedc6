"""The command line, run as a user would: a subprocess, a checkpoint with a tokenizer."""
from __future__ import annotations

import subprocess
import sys

from conftest import write_checkpoint


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_colab", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_text_and_prints_stats(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", vocab=300, tokenizer=True, shard_size="60KB")
    r = run_cli("generate", "--model", str(ck), "--prompt", "def f(x):", "--max-new-tokens", "12",
                "--device", "cpu", "--experts-on-device", "2", "--prefetch", "1")
    assert r.returncode == 0, r.stderr
    assert "def f(x):" in r.stdout
    assert "tokens/s" in r.stdout
    for key in ("hits", "misses", "prefetch hits", "MiB to device"):
        assert key in r.stdout


def test_bad_input_is_one_clear_line(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "missing"), "--device", "cpu")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_quantize_then_generate_from_the_quantized_directory(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", vocab=300, hidden=64, intermediate=128, tokenizer=True)
    r = run_cli("quantize", str(ck), str(tmp_path / "q"), "--quant", "4,2", "--device", "cpu",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "q"), "--prompt", "for i in", "--max-new-tokens",
                "8", "--device", "cpu", "--experts-on-device", "1", "--swap")
    assert r.returncode == 0, r.stderr
    assert "for i in" in r.stdout and "tokens/s" in r.stdout
