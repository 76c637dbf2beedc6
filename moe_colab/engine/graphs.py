"""CUDA graphs for one-token calls: when decoding, launching kernels costs more than running them.

Decoding one sequence runs each expert and each attention projection on one row, x [1, H]: a
few kernels of a few microseconds each, while the host spends 80-120 us in Triton's launch path
per low-bit matmul (an H200 profile of the full-size model, docs/benchmark_notes.md). A CUDA
graph records the kernels of one call once and replays all of them with a single launch.

    graphs = OneTokenGraphs()
    y = graphs.run(key, fn, x)     # fn(x) -> tensor; key names every tensor fn reads besides x

    1st call of a key   eager (Triton compiles here, never inside a capture)
    2nd call            capture fn on a static copy of x, then replay it
    later calls         copy x into the static input, replay, return a copy of the output

Only CUDA inputs with one row, outside any other capture, and while ``ENABLED``. Off by default
until its GPU equivalence test (tests/test_engine_gpu.py::test_cuda_graphs_match_eager) has
passed: turn it on with ``moe_colab.engine.graphs.ENABLED = True`` or MOE_COLAB_CUDA_GRAPHS=1;
``python -m moe_colab bench`` turns it on (``--cuda-graphs off`` to compare). A graph reads its weights at fixed addresses:
the engine's slots and a QuantLinear's buffers never move, and a key includes those addresses.
All graphs share one memory pool: they replay one at a time on one stream, and each output is
copied out before the next replay. A failed capture turns graphs off with a warning; calls then
run eagerly, with the same results.

Reference: CUDA graphs in PyTorch, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

ENABLED = os.environ.get("MOE_COLAB_CUDA_GRAPHS", "0") == "1"
_POOL = None              # one private memory pool for every graph (see the docstring)
_STREAM: dict = {}        # device -> side stream that captures run on


class OneTokenGraphs:
    """Graphs of ``fn(x)`` for x [1, features] on CUDA, one per key (see the module docstring)."""

    def __init__(self):
        self.seen: set = set()
        self.graphs: dict = {}          # key -> (graph, static input, static output)

    def run(self, key, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        global ENABLED
        if not (ENABLED and x.is_cuda and x.dim() == 2 and x.shape[0] == 1) \
                or torch.cuda.is_current_stream_capturing():
            return fn(x)
        key = (key, x.dtype, x.shape[1], x.device.index)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return fn(x)
            try:
                entry = self.graphs[key] = _capture(fn, x)
            except Exception as e:           # an op that cannot be captured on this setup
                ENABLED = False
                warnings.warn(f"moe_colab: CUDA graph capture failed ({type(e).__name__}: {e}); "
                              "decoding continues without graphs", stacklevel=2)
                return fn(x)
        graph, x_static, y_static = entry
        x_static.copy_(x)
        graph.replay()
        return y_static.clone()

    def __getstate__(self):              # copies and pickles start without graphs
        return {}

    def __setstate__(self, state):
        self.__init__()

    def clear(self) -> None:
        self.seen.clear()
        self.graphs.clear()


def _capture(fn, x: torch.Tensor):
    global _POOL
    device = x.device
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    side = _STREAM.setdefault(device.index, torch.cuda.Stream(device))
    current = torch.cuda.current_stream(device)
    x_static = x.clone()
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        # A warm-up on the static input and this stream first, as PyTorch's notes advise: whatever
        # it lazily initialises or compiles must not happen inside the capture.
        fn(x_static)
        # thread_local: another thread's CUDA calls (a memory monitor, say) do not break it.
        graph.capture_begin(pool=_POOL, capture_error_mode="thread_local")
        try:
            y_static = fn(x_static)
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph, x_static, y_static     # capturing ran nothing: the caller replays
