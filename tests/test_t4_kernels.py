"""The T4's sm_75 Triton code, run on another GPU (benchmarks/t4_kernels.py, benchmarks/sm75_ptx.py).

CPU: the cases cover what a T4 runs; the launches captured from moe_colab's own dispatch equal an
independent re-derivation (and a changed dispatch is caught); launches compile to PTX with
".target sm_75", installed in place of the cubin. GPU (@pytest.mark.gpu): a subset of the cases
runs from the sm_75 PTX against the torch reference, and the harness fails a kernel fed a wrong
argument.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from moe_colab.quant import kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
T4K = pytest.importorskip("t4_kernels")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_compiler = pytest.mark.skipif(kernels.triton is None or kernels.interpreting(),
                                    reason="needs Triton compiling for real GPUs (TRITON_INTERPRET unset)")


def test_cases_cover_what_a_t4_runs():
    cases = T4K.t4_cases()
    for bits in (2, 3, 4):
        mine = [c for c in cases if c["bits"] == bits]
        assert {c["T"] for c in mine if c["cfg"]["path"] == "fma"} >= set(range(1, 17))
        assert {c["T"] for c in mine if c["cfg"]["path"] == "dequant"} >= {17, 64, 512}
        assert all(c["cfg"]["path"] != "dot" for c in mine)                     # no tensor cores on sm_75
        for shape in T4K.MIXTRAL:
            fused = [c for c in mine if c["shape"] == shape and c["cfg"]["path"] == "fma"]
            assert {c["cfg"]["split_k"] > 1 for c in fused} == {True, False}, (bits, shape)
            for c in mine:                              # each case's config is the T4's, or a forced split
                if c["split_k"] is None:
                    g = T4K.SCHEMES[bits][0]
                    assert c["cfg"] == kernels.launch_config(c["T"], c["shape"], bits, g, torch.float16, (7, 5), 40)
    # prefill on a Mixtral matrix dequantizes in several row chunks
    big = next(c for c in cases if c["cfg"]["path"] == "dequant" and c["shape"] == (14336, 4096))
    assert len(T4K.case_launches_cpu(big)) == -(-14336 * 4096 // kernels.DEQUANT_CHUNK)


@needs_compiler
def test_captured_launches_match_and_compile_for_sm75():
    cases = T4K.t4_cases(shapes=[(4096, 14336), (36, 512)], Ts=[1, 3, 16, 17])
    try:
        failures = T4K.check_cpu(cases, compile_n=2, log=lambda s: None)
    except T4K.P.InternalsMoved as e:
        pytest.skip(str(e))
    assert failures == []


@needs_compiler
def test_a_changed_dispatch_is_caught(monkeypatch):
    """If quant_linear_triton launched something else than launch_config says (here: half the
    row block), the comparison with the re-derivation reports it."""
    real = kernels._launch_config

    def halved(*a, **kw):
        cfg = dict(real(*a, **kw))
        if cfg["path"] != "dequant":
            cfg["block_n"] //= 2
        return cfg
    monkeypatch.setattr(kernels, "_launch_config", halved)
    cases = T4K.t4_cases(bits_list=(2,), shapes=[(4096, 14336)], Ts=[1, 17])
    failures = T4K.check_cpu(cases, compile_n=0, log=lambda s: None)
    assert any("grid" in f for f in failures) and any("BLOCK_N" in f for f in failures)
    assert not any("T=17" in f for f in failures)       # the dequant path did not change


@needs_compiler
def test_installed_ptx_and_what_launch_refuses():
    case = T4K.t4_cases(bits_list=(3,), shapes=[(36, 512)], Ts=[2])[0]
    kernel, grid, args, meta = T4K.case_launches_cpu(case)[0]
    try:
        compiled, spec = T4K.P.compile_launch(kernel, args, meta)
    except T4K.P.InternalsMoved as e:
        pytest.skip(str(e))
    ptx = compiled.asm["ptx"]
    assert T4K.P.ptx_target(ptx) == "sm_75" and compiled.kernel == ptx.encode() + b"\0"
    assert compiled.sm75_cubin[:4] == b"\x7fELF" and compiled.module is None
    assert list(spec.bound) == list(compiled.src.signature)      # one value per parameter, constexprs too
    with pytest.raises(TypeError, match="one per parameter"):
        T4K.P.launch(compiled, grid, *list(spec.bound.values())[:-1])
    with pytest.raises(T4K.P.Sm75Error, match="already loaded"):
        compiled.module = object()
        T4K.P.install_ptx(compiled)


# -- GPU ---------------------------------------------------------------------------------------
GPU_CASES = dict(shapes=[(4096, 14336), (36, 512)], Ts=[1, 2, 16, 17])


@pytest.mark.gpu
@cuda
def test_gpu_sm75_ptx_matches_the_reference():
    cases = T4K.t4_cases(**GPU_CASES)
    res = T4K.run_cases(cases, jobs=8, log=print)
    bad = [(r["case"], r["problems"], r.get("error")) for r in res["rows"] if not r["ok"]]
    assert res["cases"] == len(cases) and bad == [], bad
    for r in res["rows"]:
        assert r["launches"] and all(l["ptx_target"] == "sm_75" for l in r["launches"])
        assert r["arg_diffs"] == []
    print(f"{res['cases']} cases, max rel err {res['max_rel_err']:.2e}, setup {res['setup']}")


@pytest.mark.gpu
@cuda
def test_gpu_harness_fails_a_kernel_with_a_wrong_argument(monkeypatch):
    real = kernels._meta_args
    monkeypatch.setattr(kernels, "_meta_args", lambda m: real(m)[3:] + real(m)[:3])   # scales <-> zeros
    for c in T4K.t4_cases(bits_list=(2,), shapes=[(36, 512)], Ts=[1, 17]):
        r = T4K.run_case(c)
        assert not r["ok"] and any("relative error" in p for p in r["problems"]), r


CONTROL = """
import sys, json
sys.path.insert(0, 'benchmarks')
import t4_kernels as T
from moe_colab.quant import kernels
assert kernels.interpreting()
cases = T.t4_cases(shapes=[(36, 512)], Ts=[1, 2, 17])
res = T.run_cases(cases, mode='native', device='cpu', log=lambda s: None)
real = kernels._meta_args
kernels._meta_args = lambda m: real(m)[3:] + real(m)[:3]        # scales <-> zeros
bad = T.run_case(cases[0], mode='native', device='cpu')
print(json.dumps({'cases': res['cases'], 'failures': res['failures'], 'diffs': sum(len(r['arg_diffs']) for r in res['rows']),
                  'bad_ok': bad['ok'], 'bad_problems': bad['problems']}))
"""


@pytest.mark.slow
def test_harness_control_under_the_interpreter():
    """run_case itself, with the real kernels under Triton's CPU interpreter (T4-independent
    configs): every case passes, and a kernel fed a wrong argument fails."""
    import json
    import subprocess

    if kernels.triton is None:
        pytest.skip("Triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", CONTROL], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["cases"] == 13 and r["failures"] == 0 and r["diffs"] == 0, r
    assert not r["bad_ok"] and any("relative error" in p for p in r["bad_problems"]), r
