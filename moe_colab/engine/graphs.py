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

Only CUDA inputs with one row, outside any other capture, and while the model's ModelCompute
(engine/compute.py) has graphs on (``OffloadOptions.cuda_graphs``). A graph reads its weights at
fixed addresses: the engine's slots and a QuantLinear's buffers never move, and a key includes
those addresses. A model's graphs share one memory pool: they replay one at a time on one
stream, and each output is copied out before the next replay. A failed capture turns graphs off
for that model only (warned once, in ``offload_stats()["fallbacks"]``); calls then run eagerly,
with the same results.

Reference: CUDA graphs in PyTorch, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs
"""
from __future__ import annotations

from typing import Callable

import torch

from .compute import ModelCompute


class OneTokenGraphs:
    """Graphs of ``fn(x)`` for x [1, features] on CUDA, one per key (see the module docstring)."""

    def __init__(self, compute: ModelCompute | None = None):
        self.compute = compute if compute is not None else ModelCompute()
        self.seen: set = set()
        self.graphs: dict = {}          # key -> (graph, static input, static output)

    def run(self, key, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if not (self.compute.cuda_graphs and x.is_cuda and x.dim() == 2 and x.shape[0] == 1) \
                or torch.cuda.is_current_stream_capturing():
            return fn(x)
        key = (key, x.dtype, x.shape[1], x.device.index)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return fn(x)
            try:
                entry = self.graphs[key] = _capture(fn, x, self.compute)
            except Exception as e:           # an op that cannot be captured on this setup
                self.compute.fall_back("cuda_graphs", f"capture failed: {type(e).__name__}: {e}",
                                       "one-token calls run eagerly (more launches per token)")
                return fn(x)
        graph, x_static, y_static = entry
        x_static.copy_(x)
        graph.replay()
        return y_static.clone()

    def __getstate__(self):              # copies and pickles start without graphs
        return {"compute": self.compute}

    def __setstate__(self, state):
        self.__init__(state.get("compute"))

    def clear(self) -> None:
        self.seen.clear()
        self.graphs.clear()


def _capture(fn, x: torch.Tensor, compute: ModelCompute):
    device = x.device
    if compute.graph_pool is None:
        compute.graph_pool = torch.cuda.graph_pool_handle()
    side = compute.capture_streams.setdefault(device.index, torch.cuda.Stream(device))
    current = torch.cuda.current_stream(device)
    x_static = x.clone()
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        # A warm-up on the static input and this stream first, as PyTorch's notes advise: whatever
        # it lazily initialises or compiles must not happen inside the capture.
        fn(x_static)
        # thread_local: another thread's CUDA calls (a memory monitor, say) do not break it.
        graph.capture_begin(pool=compute.graph_pool, capture_error_mode="thread_local")
        try:
            y_static = fn(x_static)
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph, x_static, y_static     # capturing ran nothing: the caller replays
