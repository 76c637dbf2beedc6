"""Run the T4's own (sm_75) Triton code on a newer NVIDIA GPU: compile for sm_75, load the PTX.

A T4 is sm_75, and Triton 3.3+ supports only sm_80+ officially (below that it lowers to FMAs,
and sm_75 fixes are not accepted). We have no T4, but PTX is forward compatible: the PTX Triton
generates for GPUTarget("cuda", 75, 32) can be JIT-compiled by the CUDA driver of any newer GPU.
So, for one launch ``kernel[grid](*args, **meta)``:

    specialize        the launch's signature, constexprs and divisibility attributes, exactly as
                      JITFunction.run would derive them, but with the sm_75 backend (no GPU needed)
    compile_launch    triton.compile(ASTSource(...), target=sm_75): PTX with ".target sm_75", and
                      the sm_75 cubin Triton's ptxas makes (what a T4 would load; kept for its
                      register / spill / local-memory report)
    install_ptx       put the PTX text, NUL-terminated, where the CompiledKernel keeps its cubin
                      (CompiledKernel.kernel): _init_handles hands that to cuModuleLoadData, which
                      accepts "a cubin, a fatbin or a NULL-terminated PTX string" and JIT-compiles it
    launch            the kernel's own launcher with ONE VALUE PER SIGNATURE ENTRY (constexprs
                      included, their values ignored), the call JITFunction.run makes

What this proves: the sm_75 PTX (Triton's layouts and lowering for sm_75: FMA instead of tensor
cores, no bf16 math) computes the right numbers. What it does not: the SASS Triton's ptxas makes
for sm_75 (the driver compiles the PTX for this GPU instead), T4 timing, T4 limits other than
those checked here (shared memory <= 64 KiB per block; registers and local memory of the real
sm_75 cubin).

Triton internals used, checked against 3.6.0 and 3.9.0 (file:line for 3.6, site-packages/triton):
compiler/compiler.py:404-501 CompiledKernel (.asm, .kernel = asm["cubin"], _init_handles ->
load_binary(name, kernel, shared, device), .run, .packed_metadata, .launch_metadata);
backends/nvidia/driver.c:102-170 loadBinary ("ss#ii", cuModuleLoadData, GIL released);
backends/nvidia/driver.py:674-714 CudaLauncher (scratch buffers allocated by the launcher);
runtime/jit.py:391-444 create_function_from_signature (the binder), :671-693 _pack_args,
:695-745 run. Triton 3.9: the same shapes (compiler.py:431, 483; driver.c:286, 306; jit.py:397,
709-731) plus the fpsan_homomorphic_casts option. A moved internal raises InternalsMoved.

References: NVIDIA, "CUDA Driver API: cuModuleLoadData"; "PTX ISA: forward compatibility";
Triton issue discussions on sm_75 support (tensor cores below sm_80 dropped in 3.3).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import multiprocessing as mp
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

SM75 = 75
T4_CC, T4_SMS = (7, 5), 40             # Tesla T4: compute capability 7.5, 40 SMs
T4_MAX_SHARED = 64 * 1024              # bytes of shared memory per block (opt-in)
T4_REGS_PER_SM = 64 * 1024             # 32-bit registers per SM


class Sm75Error(RuntimeError):
    """The sm_75 PTX could not be compiled, loaded or launched."""


class InternalsMoved(Sm75Error):
    """This Triton's internals are not the ones this module was written against."""


@functools.lru_cache(maxsize=None)
def _tr():
    """The Triton names used here, or InternalsMoved naming what is missing."""
    import triton
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        raise InternalsMoved(f"Triton {triton.__version__}: {e}") from e
    return argparse.Namespace(triton=triton, knobs=knobs, GPUTarget=GPUTarget, ASTSource=ASTSource,
                              make_backend=make_backend, binder=create_function_from_signature,
                              version=triton.__version__)


def target(cc: int = SM75):
    return _tr().GPUTarget("cuda", cc, 32)


@functools.lru_cache(maxsize=None)
def _backend(cc: int):
    return _tr().make_backend(target(cc))


def ptx_target(ptx: str) -> str | None:
    m = re.search(r"^\s*\.target\s+([\w.]+)", ptx, re.M)
    return m.group(1) if m else None


def ptx_version(ptx: str) -> str | None:
    m = re.search(r"^\s*\.version\s+([\d.]+)", ptx, re.M)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------------
# specialise a launch as the JIT does
# ------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """What triton.compile receives for one launch, and what the launcher is handed."""
    kernel: object
    bound: dict                  # parameter -> value, in signature order (the launcher's arguments)
    signature: dict              # parameter -> "*fp16" | "i32" | "constexpr" | ...
    constexprs: dict             # (index,) -> value
    attrs: dict                  # (index,) -> [["tt.divisibility", 16]] ...
    options: object              # CUDAOptions for the target
    key: tuple = field(default=())


def _jit_kwargs(kernel, meta: dict) -> dict:
    """The launch's keyword arguments plus what JITFunction.run injects (3.6: debug and
    instrumentation_mode, jit.py:696-697; 3.9 adds fpsan_homomorphic_casts)."""
    knobs = _tr().knobs
    kw = dict(meta)
    kw["debug"] = kw.get("debug", getattr(kernel, "debug", None)) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    return kw


def specialize(kernel, args, meta, cc: int = SM75) -> Spec:
    """How JITFunction.run specialises ``kernel[grid](*args, **meta)`` for sm_<cc>: its binder,
    then _pack_args. Tensors contribute only their dtype and data_ptr() % 16: no GPU needed."""
    t = _tr()
    backend = _backend(cc)
    kw = _jit_kwargs(kernel, meta)
    try:
        binder = t.binder(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kw)
        opts, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    except (AttributeError, TypeError, KeyError) as e:
        raise InternalsMoved(f"Triton {t.version} specialises arguments differently: {type(e).__name__}: {e}") from e
    key = (getattr(kernel, "cache_key", None) or id(kernel), cc, repr(specialization),
           repr(sorted((k, repr(v)) for k, v in options.items())))
    return Spec(kernel, dict(bound), dict(signature), dict(constexprs), dict(attrs), opts, key)


# ------------------------------------------------------------------------------------------------
# compile for sm_75 and load the PTX instead of the cubin
# ------------------------------------------------------------------------------------------------
def install_ptx(compiled, expect_target: str = "sm_75"):
    """Make ``compiled`` load its PTX: compiled.kernel = asm["ptx"] + NUL (what _init_handles
    passes to cuModuleLoadData); the sm_75 cubin is kept as compiled.sm75_cubin; module, function
    and the cached launcher are reset so the next _init_handles really loads. asm, metadata and
    the launcher's construction are untouched: the launcher depends on the signature and
    metadata, not on the binary."""
    ptx = compiled.asm["ptx"] if "ptx" in compiled.asm else None
    if not ptx:
        raise Sm75Error(f"{compiled.name}: no PTX kept (asm has {sorted(compiled.asm)})")
    if ptx_target(ptx) != expect_target:
        raise Sm75Error(f"{compiled.name}: PTX targets {ptx_target(ptx)}, expected {expect_target} "
                        f"(TRITON_OVERRIDE_ARCH={os.environ.get('TRITON_OVERRIDE_ARCH')!r}?)")
    if getattr(compiled, "module", None) is not None:
        raise Sm75Error(f"{compiled.name}: already loaded; install_ptx must come before the first launch")
    if not hasattr(compiled, "kernel"):
        raise InternalsMoved("CompiledKernel has no .kernel (where Triton 3.6-3.9 keep the binary)")
    compiled.sm75_cubin = compiled.kernel
    compiled.kernel = ptx.encode("utf-8") + b"\0"
    compiled.module = compiled.function = compiled._run = None
    compiled.ptx_installed = True
    return compiled


_COMPILED: dict = {}       # Spec.key -> CompiledKernel, like the JIT's per-specialisation cache


def compile_launch(kernel, args, meta, cc: int = SM75):
    """(compiled, spec) of the launch kernel[grid](*args, **meta) for sm_<cc>, PTX installed."""
    spec = specialize(kernel, args, meta, cc)
    compiled = _COMPILED.get(spec.key)
    if compiled is None:
        t = _tr()
        try:
            compiled = t.triton.compile(t.ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs),
                                        target=target(cc), options=spec.options.__dict__)
        except Exception as e:
            raise Sm75Error(f"{kernel.__name__}: triton.compile for sm_{cc} failed: {type(e).__name__}: "
                            f"{str(e)[:2000]}") from e
        _COMPILED[spec.key] = install_ptx(compiled, f"sm_{cc}")
    return compiled, spec


def load(compiled):
    """_init_handles: the driver JIT-compiles the PTX for this GPU."""
    if getattr(compiled, "module", None) is not None and getattr(compiled, "function", None):
        return compiled
    try:
        compiled._init_handles()
    except Exception as e:
        ptx = compiled.asm["ptx"]
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        raise Sm75Error(f"{compiled.name}: loading {ptx_target(ptx)} PTX (.version {ptx_version(ptx)}) on {dev} "
                        f"failed: {type(e).__name__}: {e} (a PTX ISA newer than the driver gives "
                        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION)") from e
    if compiled.module is None or not compiled.function:
        raise Sm75Error(f"{compiled.name}: _init_handles returned without a module")
    return compiled


def preload(compiled_list, threads: int = 8) -> list[str]:
    """Load many kernels at once: loadBinary releases the GIL around cuModuleLoadData, so the
    driver's JIT compiles run side by side (and each sm_75 cubin's cuobjdump report is read
    meanwhile). Returns the errors (each is retried by launch)."""
    pending = [c for c in compiled_list if getattr(c, "module", None) is None]
    if not pending:
        return []
    device = torch.cuda.current_device()
    _tr().triton.runtime.driver.active.get_current_device()     # initialise Triton's driver once, here

    def one(c):
        torch.cuda.set_device(device)
        try:
            sm75_usage(c)
            load(c)
            return None
        except Exception as e:
            return f"{c.name}: {e}"
    with cf.ThreadPoolExecutor(max(1, threads)) as ex:
        return [e for e in ex.map(one, pending) if e]


def launch(compiled, grid, *args, stream=None, t4_limits: bool = True):
    """Launch a PTX-installed kernel on the current device as JITFunction.run does:
    compiled.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *args), args = spec.bound.values() (one per signature entry). The launcher itself
    allocates global/profile scratch (none for the moe_colab kernels)."""
    if not getattr(compiled, "ptx_installed", False):
        raise Sm75Error(f"{getattr(compiled, 'name', compiled)}: no PTX installed (compile_launch)")
    sig = compiled.src.signature
    if len(args) != len(sig):
        raise TypeError(f"{compiled.name}: the launcher takes {len(sig)} arguments (one per parameter, "
                        f"constexprs included: {list(sig)}), got {len(args)}")
    if t4_limits and compiled.metadata.shared > T4_MAX_SHARED:
        raise Sm75Error(f"{compiled.name}: {compiled.metadata.shared} B shared memory > the T4's {T4_MAX_SHARED} B")
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    load(compiled)
    if (getattr(compiled.metadata, "global_scratch_size", 0) or 0) > 0:
        from triton.runtime import _allocation
        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            _tr().triton.set_allocator(lambda size, align, s: torch.empty(size, dtype=torch.int8, device="cuda"))
    t = _tr()
    drv = t.triton.runtime.driver.active
    if stream is None:
        stream = drv.get_current_stream(drv.get_current_device())
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *args), t.knobs.runtime.launch_enter_hook,
                 t.knobs.runtime.launch_exit_hook, *args)


def sm75_usage(compiled) -> dict:
    """{"regs", "stack", "shared", "local"} of the sm_75 cubin (what a T4 runs), read with the
    cuobjdump Triton ships; {} if it is not there."""
    if not hasattr(compiled, "sm75_usage_cache"):
        out = {}
        cubin = getattr(compiled, "sm75_cubin", None)
        import triton
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if cubin and os.path.exists(tool):
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(cubin)
            try:
                r = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60)
            finally:
                os.unlink(f.name)
            for key, name in (("REG", "regs"), ("STACK", "stack"), ("SHARED", "shared"), ("LOCAL", "local")):
                m = re.search(rf"\b{key}:(\d+)", r.stdout)
                if m:
                    out[name] = int(m.group(1))
        compiled.sm75_usage_cache = out
    return compiled.sm75_usage_cache


def t4_problem(compiled) -> str | None:
    """Why the sm_75 cubin would not run as compiled on a T4 (registers, spills), or None."""
    u = sm75_usage(compiled)
    warps = compiled.metadata.num_warps
    if u.get("regs") and u["regs"] * 32 * warps > T4_REGS_PER_SM:
        return f"{u['regs']} registers x {32 * warps} threads > {T4_REGS_PER_SM} per SM"
    if u.get("local"):
        return f"{u['local']} B local memory per thread (register spills) on sm_75"
    return None


# ------------------------------------------------------------------------------------------------
# warm Triton's on-disk cache in parallel (the parent's compile_launch then hits it)
# ------------------------------------------------------------------------------------------------
def _compile_worker(item):
    module, name, signature, constexprs, attrs, options, cc = item
    import importlib
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    kernel = getattr(importlib.import_module(module), name)
    try:
        t = _tr()
        t.triton.compile(t.ASTSource(kernel, signature, constexprs, attrs), target=target(cc), options=options)
        return None
    except Exception as e:
        return f"{name}: {type(e).__name__}: {str(e)[:500]}"


def precompile(specs, jobs: int) -> list[str]:
    """triton.compile ``specs`` in ``jobs`` spawned processes (no CUDA in them); returns errors."""
    if jobs <= 1 or len(specs) <= 1:
        return []
    items = [(s.kernel.fn.__module__, s.kernel.__name__, s.signature, s.constexprs, s.attrs,
              dict(s.options.__dict__), SM75) for s in specs]
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        return [e for e in ex.map(_compile_worker, items) if e]
