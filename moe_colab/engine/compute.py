"""ModelCompute: how one model runs its low-bit matmuls and one-token calls, and what fell back.

Two choices belong to a model, never to the process:

    kernels       "auto": the fused Triton kernels on CUDA (moe_colab/quant/kernels.py), the torch
                  reference (quant/packing.py) on CPU; "triton" or "torch" force one
    cuda_graphs   replay one-token calls as CUDA graphs (engine/graphs.py)

Self-test on first use. Triton lists only sm_80+ as supported; a T4 (sm_75) may compile a kernel
that computes the wrong numbers. So the first time a model multiplies with one scheme (bit
width, group size, scale group) and dtype on one device, every kernel path that model will take
there runs once on small inputs against the torch reference (``self_test_cases``: one token
with and without split-K, a few tokens, the most fused tokens, one prefill row more, each with
the launch configuration this GPU gets). A wrong result or an exception switches THIS model to
the fallback; another model in the same process keeps its kernels.

The fallback (quant/fallback.py) is not the slow reference: each matrix is dequantized in one
pass into a reusable 16-bit workspace and multiplied by cuBLAS; the dequantizing kernel is a
small CUDA kernel compiled by NVRTC, itself checked bit-for-bit against packing.dequantize on
first use, else vectorised torch. Every switch warns once, saying why and what it costs, and is
recorded in ``fallbacks`` (``model.offload_stats()["fallbacks"]``). A bad input (wrong shape,
wrong device) is an error, never a fallback.
"""
from __future__ import annotations

import warnings

import torch

# Relative-norm tolerance against packing.quant_linear_torch in fp32 (the GPU tests' bounds): the
# output's rounding to x's dtype, W's for the dequant path; fp32 leaves room for TF32 matmuls. A
# wrong kernel is off by far more (a swapped argument: ~1).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3}
SELF_TEST_ROWS = 80            # output rows of the test matrix: one full and one partial row block


def self_test_cases(bits: int, group_size: int, dtype: torch.dtype, cc, sms) -> list[dict]:
    """[{T, shape, split_k, cfg}]: the kernel paths a model with this scheme takes on a (cc, sms)
    GPU, on a small matrix with 32 groups per plane (so split-K happens): one token (the GEMV
    variant) and a few tokens, each with split-K (fp32 partial sums) and without (the result
    stored in x's dtype), the most fused tokens (the tensor-core path where this GPU has it), and
    one prefill row more (the dequant kernel). Cases with the same launch config are merged."""
    from ..quant import kernels as K

    k = K.PLANES[bits] * group_size * 32
    shape = (SELF_TEST_ROWS, k)
    xdtype = torch.float32 if (dtype == torch.bfloat16 and tuple(cc) < (8, 0)) else dtype
    cases, seen = [], set()
    for T, split_k in ((1, None), (1, 1), (2, None), (2, 1), (K.MAX_FUSED_T, None), (K.MAX_FUSED_T + 1, None)):
        cfg = K.launch_config(T, shape, bits, group_size, xdtype, tuple(cc), sms, split_k=split_k)
        key = tuple(sorted(cfg.items()))
        if key in seen:
            continue
        seen.add(key)
        cases.append({"T": T, "shape": shape, "split_k": split_k, "cfg": cfg})
    return cases


def _test_matrix(bits, group_size, scale_group, shape, device, seed=0):
    """Stored tensors of a random low-bit matrix (random codes, scales and zeros) on ``device``."""
    from ..quant import packing

    g = torch.Generator().manual_seed(seed)
    n, k = shape
    mat = packing.pack_codes(torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g), bits)
    S = torch.rand(n * k // group_size, generator=g) * 0.02 + 1e-3
    Z = torch.rand(n * k // group_size, generator=g) * (2 ** bits - 1)
    for v, t in (("s", S), ("z", Z)):
        mat[f"{v}_q"], mat[f"{v}_scale"], mat[f"{v}_zero"] = packing.meta_quantize(t, scale_group)
    return {name: t.to(device) for name, t in mat.items()}


def _capturing(x) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _rel_err(y, ref) -> torch.Tensor:
    return (y.float() - ref.float()).norm() / ref.float().norm()


class ModelCompute:
    """``fused``: the fused-kernel function, ``fused(x, mat, bits, group_size, scale_group,
    shape, *, split_k=None, trusted=False)``; by default kernels.quant_linear_triton on CUDA
    tensors. One given here runs on every device (tests inject a broken one on CPU)."""

    def __init__(self, kernels: str = "auto", cuda_graphs: bool = False, *, self_test: bool = True,
                 fused=None):
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        self.kernels = kernels
        self.cuda_graphs = bool(cuda_graphs)
        self.self_test = bool(self_test)
        self.fused = fused
        self.fallbacks: dict[str, str] = {}     # what -> why (kernels, cuda_graphs, fallback_cuda)
        self.tested: dict = {}                  # (device, dtype, bits, g, sg) -> "ok" | why it failed
        self.fallback_impls: dict = {}          # device -> "cuda" | "torch" (quant/fallback.py)
        self.graph_pool = None                  # one private memory pool for this model's graphs
        self.capture_streams: dict = {}         # device index -> side stream captures run on
        self._workspace = None                  # the fallback's dequantized rows, made on first use

    def fall_back(self, what: str, reason: str, cost: str) -> None:
        """Record that ``what`` is off for this model, and warn once."""
        if what in self.fallbacks:
            return
        self.fallbacks[what] = reason
        if what == "cuda_graphs":
            self.cuda_graphs = False
        warnings.warn(f"moe_colab: {what} switched off for this model ({reason}); {cost}", stacklevel=3)

    @property
    def triton_on(self) -> bool:
        return self.kernels != "torch" and "kernels" not in self.fallbacks

    def _fused_fn(self):
        from ..quant import kernels as K
        return self.fused if self.fused is not None else K.quant_linear_triton

    def _kernel_device(self, x) -> bool:
        """Does x's device run the fused kernels (and so the self-test and the fallback)?"""
        return self.kernels != "torch" and (x.is_cuda or self.fused is not None)

    # -- the matmul ---------------------------------------------------------------------------
    def quant_linear(self, x, mat, bits, group_size, scale_group, shape, trusted: bool = False):
        """x [..., in] -> x @ W.T [..., out] from the low-bit format. ``trusted``: mat was checked
        before (a cache slot's fixed views): skip the per-call checks."""
        from ..quant import kernels as K

        if not self._kernel_device(x):
            if self.kernels == "triton" and not x.is_cuda and K.interpreting():
                return K.quant_linear_triton(x, mat, bits, group_size, scale_group, shape)
            return K.quant_linear(x, mat, bits, group_size, scale_group, shape, backend="torch")
        if not trusted:
            K.check_call(x, mat, bits, group_size, scale_group, shape)  # bad input raises, never falls back
        if self.triton_on and self.fused is None and K.triton is None:
            self._kernel_failed(f"Triton is not available ({K.TRITON_ERROR})", x, bits, group_size, scale_group)
        if self.triton_on and self.self_test and not _capturing(x):
            self._ensure_tested(x, bits, group_size, scale_group)
        if self.triton_on:
            try:
                return self._fused_fn()(x, mat, bits, group_size, scale_group, shape, trusted=True)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:              # a compile or launch failure on this GPU / Triton
                if _capturing(x):
                    raise                       # inside a capture: the graph falls back, not the kernels
                if self.kernels == "triton":
                    raise
                self._kernel_failed(f"{type(e).__name__}: {str(e).strip()[:300]}", x, bits, group_size,
                                    scale_group)
        return self.fallback_linear(x, mat, bits, group_size, scale_group, shape)

    def fallback_linear(self, x, mat, bits, group_size, scale_group, shape):
        """The fast fallback (quant/fallback.py): dequantize in chunks, then cuBLAS."""
        from ..quant import fallback as FB

        if self._workspace is None:
            self._workspace = FB.Workspace()
        impl = self._fallback_impl(x, bits, group_size, scale_group)
        return FB.quant_linear_fallback(x, mat, bits, group_size, scale_group, shape, impl=impl,
                                        workspace=self._workspace)

    # -- the self-test --------------------------------------------------------------------------
    def _ensure_tested(self, x, bits, group_size, scale_group) -> None:
        key = (str(x.device), x.dtype, bits, group_size, scale_group)
        if key in self.tested:
            return
        problem = self.run_self_test(x.device, x.dtype, bits, group_size, scale_group)
        self.tested[key] = problem or "ok"
        if problem is not None:
            if self.kernels == "triton":
                raise RuntimeError(f"moe_colab: the fused kernels failed their self-test ({problem}) "
                                   "and kernels='triton' forbids the fallback")
            self._kernel_failed(f"self-test: {problem}", x, bits, group_size, scale_group)

    def run_self_test(self, device, dtype, bits, group_size, scale_group) -> str | None:
        """None if every case of ``self_test_cases`` matches packing.quant_linear_torch (fp32), else
        what went wrong (the first failing case, its error or exception)."""
        from ..quant import kernels as K
        from ..quant.packing import quant_linear_torch

        device = torch.device(device)
        cc, sms = K._gpu_info(device.index) if device.type == "cuda" else ((8, 0), 4)
        fused = self._fused_fn()
        tol = TOLERANCE[dtype]
        mats, errs, names = {}, [], []
        gen = torch.Generator().manual_seed(1)
        for case in self_test_cases(bits, group_size, dtype, cc, sms):
            T, shape, cfg = case["T"], case["shape"], case["cfg"]
            name = (f"{bits}-bit T={T} {cfg['path']}" + (f" split_k={cfg['split_k']}" if "split_k" in cfg else "")
                    + f" {str(dtype)[6:]}")
            if shape not in mats:
                mats[shape] = _test_matrix(bits, group_size, scale_group, shape, device)
            x = torch.randn(T, shape[1], generator=gen).to(device=device, dtype=dtype)
            try:
                kw = {} if case["split_k"] is None else {"split_k": case["split_k"]}
                y = fused(x, mats[shape], bits, group_size, scale_group, shape, trusted=True, **kw)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                return f"{name}: {type(e).__name__}: {str(e).strip()[:300]}"
            if tuple(y.shape) != (T, shape[0]) or y.dtype != dtype:
                return f"{name}: returned {y.dtype} {tuple(y.shape)}, expected {dtype} {(T, shape[0])}"
            ref = quant_linear_torch(x.float(), mats[shape], bits, group_size, scale_group, shape)
            errs.append(torch.where(torch.isfinite(y).all(), _rel_err(y, ref), torch.tensor(float("inf"), device=device)))
            names.append(name)
        for name, err in zip(names, torch.stack(errs).tolist()):    # one synchronisation
            if not err < tol:
                return f"{name}: relative error {err:.3g} against the torch reference (tolerance {tol:g})"
        return None

    # -- choosing and reporting the fallback ----------------------------------------------------
    def _fallback_impl(self, x, bits, group_size, scale_group) -> str:
        """"cuda" (NVRTC dequantize kernel, checked bit-for-bit once per device and scheme) where it
        works, else "torch"."""
        from ..quant import fallback as FB
        from ..quant import packing

        if not x.is_cuda:
            return "torch"
        dev = str(x.device)
        impl = self.fallback_impls.get(dev)
        if impl == "torch" or _capturing(x):
            return impl or "torch"
        key = ("fallback", dev, bits, group_size, scale_group)
        if impl == "cuda" and key in self.tested:
            return "cuda"
        try:                                    # the kernel must reproduce packing.dequantize exactly
            shape = (SELF_TEST_ROWS, FB.PLANES[bits] * group_size * 4)
            mat = _test_matrix(bits, group_size, scale_group, shape, x.device, seed=2)
            for dtype in (torch.float16, torch.float32):
                w = torch.empty(shape[0] - 3, shape[1], device=x.device, dtype=dtype)
                FB.dequantize_rows(mat, bits, group_size, scale_group, shape, (2, shape[0] - 1), w, "cuda")
                ref = packing.dequantize(mat, bits, group_size, scale_group, shape, dtype)[2:-1]
                if not torch.equal(w, ref):
                    bad = int((w != ref).sum())
                    raise RuntimeError(f"{bad} of {w.numel()} {str(dtype)[6:]} weights differ from packing.dequantize")
            self.fallback_impls[dev] = "cuda"
            self.tested[key] = "ok"
            return "cuda"
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            self.fallback_impls[dev] = "torch"
            self.fall_back("fallback_cuda", f"the NVRTC dequantize kernel on {dev}: {type(e).__name__}: "
                           f"{str(e).strip()[:300]}",
                           "the fallback dequantizes with vectorised torch instead "
                           f"(~{FB.bytes_per_weight('torch', bits, group_size):.0f} bytes per weight instead of "
                           f"~{FB.bytes_per_weight('cuda', bits, group_size):.1f})")
            return "torch"

    def _kernel_failed(self, reason: str, x, bits: int, group_size: int, scale_group: int) -> None:
        from ..quant import fallback as FB

        if "kernels" in self.fallbacks:
            return
        where = torch.cuda.get_device_name(x.device) if x.is_cuda else "this device"
        impl = self._fallback_impl(x, bits, group_size, scale_group)   # chosen (and checked) first
        how = {"cuda": "a CUDA kernel built with NVRTC", "torch": "vectorised torch"}[impl]
        fused, slow = FB.bytes_per_weight("fused", bits, group_size), FB.bytes_per_weight(impl, bits, group_size)
        self.fall_back("kernels", f"on {where}: {reason}",
                       f"low-bit matmuls now dequantize each matrix into a 16-bit workspace ({how}) and "
                       f"multiply with cuBLAS: ~{slow:.1f} bytes moved per weight instead of the fused "
                       f"kernel's ~{fused:.2f} ({slow / fused:.0f}x; docs/t4_kernels.md measures it)")

    def report(self) -> dict:
        return dict(self.fallbacks)
