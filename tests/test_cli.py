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


# -- issue 12: a user error is one line and exit 2, never a traceback -------------------------------
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import moe_colab  # noqa: E402
from moe_colab.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "ck", vocab=300, tokenizer=True)


def run_main(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def user_error_cases(root, ck):
    """(id, argv, what the one line must say)."""
    afile = root / "afile"
    afile.write_text("x")
    listcfg = root / "listcfg"
    listcfg.mkdir()
    (listcfg / "config.json").write_text("[1, 2]")
    badgen = root / "badgen"
    if not badgen.exists():
        import shutil
        shutil.copytree(ck, badgen)
        (badgen / "generation_config.json").write_text("{oops")
    qsrc = root / "qsrc"                                   # quantizable widths (groups of 64)
    if not qsrc.exists():
        write_checkpoint(qsrc, layers=1, experts=2, top_k=1, hidden=64, intermediate=128)
    cpu = ("--device", "cpu")
    return [
        ("missing-model", ["generate", "--model", str(root / "nowhere"), *cpu], "does not exist"),
        ("model-is-a-file", ["generate", "--model", str(afile), *cpu], "is a file, not a directory"),
        ("config-list", ["generate", "--model", str(listcfg), *cpu], "holds a JSON list"),
        ("bad-generation-config", ["generate", "--model", str(badgen), *cpu], "generation_config.json"),
        ("temperature-negative", ["generate", "--model", str(ck), "--temperature", "-1", *cpu],
         "--temperature -1.0: `temperature` (=-1.0) has to be a strictly positive float"),
        ("temperature-nan", ["generate", "--model", str(ck), "--temperature", "nan", *cpu], "--temperature nan"),
        ("top-p-2", ["generate", "--model", str(ck), "--temperature", "0.7", "--top-p", "2", *cpu],
         "--top-p 2.0: `top_p` has to be a float > 0"),
        ("max-new-tokens-0", ["generate", "--model", str(ck), "--max-new-tokens", "0", *cpu],
         "--max-new-tokens: `max_new_tokens` must be greater than 0"),
        ("experts-0", ["generate", "--model", str(ck), "--experts-on-device", "0", *cpu],
         "experts_on_device=0 is outside 1..4"),
        ("prefetch-negative", ["generate", "--model", str(ck), "--prefetch", "-1", *cpu], "prefetch=-1 is outside"),
        ("quant-bogus", ["generate", "--model", str(ck), "--quant", "bogus", *cpu], "unknown quantization preset"),
        ("chat-without-template", ["generate", "--model", str(ck), "--chat", *cpu], "has no chat template"),
        ("quantize-onto-a-file", ["quantize", str(qsrc), str(afile), "--device", "cpu", "--no-progress"],
         "is a file, not a directory"),
        ("quantize-under-a-file", ["quantize", str(qsrc), str(afile / "q"), "--device", "cpu", "--no-progress"],
         "is a file, not a directory"),
        ("quantize-into-source", ["quantize", str(qsrc), str(qsrc), "--device", "cpu", "--no-progress"],
         "is (inside) the source checkpoint"),
        ("quantize-none", ["quantize", str(qsrc), str(root / "q0"), "--quant", "none", "--device", "cpu"],
         "selects no quantization"),
        ("verify-not-quantized", ["verify", str(ck)], "is not a quantized directory"),
        ("plan-unknown-model", ["plan", "mixtral-9x9b"], "is not a preset"),
        ("plan-budget-inf", ["plan", "mixtral-8x7b", "--host-bytes", "inf"], "--host-bytes: cannot read 'inf'"),
    ]


def test_every_user_error_is_one_line_and_exit_2(tok_ckpt, tmp_path, capsys):
    for case, argv, says in user_error_cases(tmp_path, tok_ckpt):
        rc, _, err = run_main(capsys, *argv)
        lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]      # tqdm bars aside
        assert rc == 2, (case, rc, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert says in lines[0], (case, lines[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_no_gpu_is_one_line(tok_ckpt, capsys):
    rc, _, err = run_main(capsys, "generate", "--model", str(tok_ckpt), "--device", "cuda")
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and "CUDA is not available" in err


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "MOE_COLAB_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "moe_colab", "generate", "--model", str(tmp_path / "x"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "does not exist" in r.stderr
    assert "MOE_COLAB_DEBUG" in moe_colab.config.ENVIRONMENT


def test_ctrl_c_during_generate_prints_the_statistics_and_exits_130(tok_ckpt):
    p = subprocess.Popen([sys.executable, "-m", "moe_colab", "generate", "--model", str(tok_ckpt), "--device",
                          "cpu", "--max-new-tokens", "100000", "--prompt", "def f(x): return x"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.time() + 240
    while "def f(x):" not in seen and time.time() < deadline:     # the streamer prints the prompt first
        ch = p.stdout.read(1)
        if not ch:
            break
        seen += ch
    time.sleep(1.0)                                               # some tokens into the generation
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted after" in out and "expert cache:" in out and "hit ratio" in out


def test_experts_on_device_auto_and_sampling(tok_ckpt, capsys):
    rc, out, err = run_main(capsys, "generate", "--model", str(tok_ckpt), "--device", "cpu", "--experts-on-device",
                            "auto", "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--quant",
                            "none")
    assert rc == 0, err
    assert "experts_on_device=4" in out and "tokens/s" in out


# -- plan and verify -----------------------------------------------------------------------------------
def test_plan_prints_the_plan_table(capsys):
    rc, out, _ = run_main(capsys, "plan", "mixtral-8x7b", "--quant", "paper-2bit", "--device-bytes", "15GiB",
                          "--host-bytes", "12.7GB")
    want = moe_colab.plan("mixtral-8x7b", "paper-2bit", device_bytes=15 * 2**30, host_bytes=int(12.7e9))
    assert rc == 0 and str(want) in out
    assert f"experts_on_device={want.experts_on_device}, swap={want.swap}" in out


def test_plan_when_nothing_fits_exits_1_with_the_refusal(capsys, monkeypatch):
    monkeypatch.setenv("MOE_COLAB_HOST_BYTES", "12.7GB")          # budgets from the environment too
    rc, out, err = run_main(capsys, "plan", "mixtral-8x7b", "--quant", "none", "--device-bytes", "15GiB")
    assert rc == 1 and "no memory plan fits mixtral-8x7b at 16-bit" in out and "what would fit instead" in out
    assert "Traceback" not in err


def test_plan_of_a_checkpoint_directory_measures_this_machine(tok_ckpt, capsys):
    rc, out, _ = run_main(capsys, "plan", str(tok_ckpt), "--device", "cpu", "--dtype", "float32")
    assert rc == 0 and "of 4 experts per layer on cpu" in out and "host budget" in out


def test_verify_names_the_damaged_file_and_how_to_redo_it(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src", layers=2, experts=2, top_k=1, hidden=64, intermediate=128)
    dst = moe_colab.quantize(src, tmp_path / "q", "paper-2bit", progress=False, device="cpu")
    rc, out, _ = run_main(capsys, "verify", str(dst))
    assert rc == 0 and "3 files match moe_colab_quant.json" in out
    victim = dst / "layer_001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-2000:-1000] = bytes(b ^ 0xFF for b in data[-2000:-1000])   # same size, same mtime second
    st = victim.stat()
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))            # bit rot keeps the mtime
    rc, out, _ = run_main(capsys, "verify", str(dst))
    assert rc == 1
    assert "layer_001.safetensors: sha256 does not match" in out
    redo = out.strip().splitlines()[-1].split("To redo only those: ")[1]
    assert redo == f"python -m moe_colab quantize {src} {dst} --quant paper-2bit"
    with pytest.warns(UserWarning, match="redoing layer_001.safetensors"):
        assert main(redo.split()[3:]) == 0                             # the printed command, run
    capsys.readouterr()
    rc, out, _ = run_main(capsys, "verify", str(dst))
    assert rc == 0, out


def test_verify_an_unfinished_directory_says_so(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src", layers=2, experts=2, top_k=1, hidden=64, intermediate=128)

    def stop(unit):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        moe_colab.quantize(src, tmp_path / "q", "paper-2bit", progress=False, device="cpu", on_unit_done=stop)
    rc, out, _ = run_main(capsys, "verify", str(tmp_path / "q"))
    assert rc == 1 and "did not finish" in out and "--quant paper-2bit" in out
    m = json.loads((tmp_path / "q" / "moe_colab_quant.json").read_text())
    assert not m["complete"]
