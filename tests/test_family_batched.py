"""The batched one-token path (engine/batched.py, quant/grouped.py) on CPU, under Triton's
interpreter: a layer's selected low-bit experts in one grouped launch per matrix give what one
call per expert gives, through load_model, for cache sizes that batch and ones that do not.

Triton reads TRITON_INTERPRET when the kernels are decorated (at import), so the interpreted run
happens in one subprocess (as tests/test_kernels.py does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _worker(workdir: str) -> None:
    """Inside the interpreted subprocess: quantize tiny Qwen3 and GPT-OSS (biases) models, decode with
    the grouped path on and off, print JSON."""
    import moe_colab
    from families import FAMILY_CHECKPOINTS, write_family_checkpoint
    from moe_colab.config import OffloadOptions
    from moe_colab.quant import kernels
    from moe_colab.quant.config import QuantConfig
    assert kernels.interpreting()
    q = QuantConfig(16, 4, expert_group_size=8)          # whole groups per plane for widths 16..64
    out = {}
    for name in ("qwen3-L3-E8-k2-dense0-sharded", "gptoss-L2-E8-k2"):
        ck = write_family_checkpoint(Path(workdir) / name, FAMILY_CHECKPOINTS[name], seed=9)
        qdir = moe_colab.quantize(ck, Path(workdir) / (name + "-q"), q, progress=False, device="cpu")
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        runs = {}
        # the grouped kernels (interpreted) against one call per expert through the torch reference
        for label, k, batched, kern in (("batched", 6, True, "triton"), ("one_by_one", 6, False, "torch"),
                                        ("waves", 1, True, "torch")):
            model = moe_colab.load_model(qdir, device="cpu", dtype=torch.float32, progress=False, experts_on_device=k,
                                         prefetch=1, options=OffloadOptions(kernels=kern, batched_experts=batched))
            g = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
            runs[label] = (g.sequences[0].tolist(), torch.stack(g.logits).flatten().tolist(),
                           dict(model.offload_compute.fallbacks),
                           sorted(str(key) for key, v in model.offload_compute.tested.items() if len(key) == 3 and v == "ok"))
        out[name] = runs
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    try:
        import triton  # noqa: F401
    except Exception:
        pytest.skip("no Triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    work = tmp_path_factory.mktemp("batched")
    proc = subprocess.run([sys.executable, "-c", f"import test_family_batched as t; t._worker({str(work)!r})"],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.parametrize("name", ["qwen3-L3-E8-k2-dense0-sharded", "gptoss-L2-E8-k2"])
def test_grouped_experts_equal_one_call_per_expert(interpreted, name):
    runs = interpreted[name]
    seq_b, logits_b, fallbacks_b, tested_b = runs["batched"]
    seq_o, logits_o, _, tested_o = runs["one_by_one"]
    seq_w, logits_w, _, tested_w = runs["waves"]
    assert fallbacks_b == {}, fallbacks_b                    # the grouped kernels passed their first-use check
    assert tested_b and not tested_o and not tested_w        # ...and really ran (never with 1 slot: waves)
    assert seq_b == seq_o == seq_w
    torch.testing.assert_close(torch.tensor(logits_b), torch.tensor(logits_o), atol=1e-4, rtol=0)
    assert logits_w == logits_o                              # one call per expert both: the same bits
    assert seq_b[:5] == seq_o[:5]
