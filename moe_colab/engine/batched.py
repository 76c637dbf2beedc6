"""A layer's selected experts as ONE computation on the one-token path (many small experts).

Qwen3-30B-A3B decodes 8 of 128 experts in each of 48 layers: 384 expert calls per token. Called
one by one, three matmul launches each (plus the generator's Python per expert), the host's
launch time exceeds the GPU's work (issue 13, item 4). So when a layer's selected experts all fit
in its device slots at once, the MoE block (moe_block.py) first collects every expert's slot
views from the cache's generator (hits at once, misses as their copies land: the compute stream
waits for each slot's copy), then runs them together:

    block:   views = [views of e for e, views in cache.experts(layer, needed, ...)]
             ys    = BatchedExperts(views, x)           # [n, 1, H]
             out   = sum_e w_e * ys[e], ascending e     (the same order as the one-by-one path)

    low-bit experts on CUDA    quant/grouped.py: one grouped GEMV per matrix over the experts'
                               buffer addresses (3 launches + elementwise), replayed as ONE CUDA
                               graph per layer (the address table is the graph's static input)
    otherwise (CPU, 16-bit)    one call per expert, exactly the one-by-one arithmetic (the CPU
                               tests stay bitwise equal across cache settings)

The first grouped call of a model on a device checks itself against the one-by-one path (the
tolerance of engine/compute.py); a mismatch or an exception switches this model to one call per
expert (warned once, ``offload_stats()["fallbacks"]``).

Slot safety. The block asks the cache's generator with ``hold=True``: the slots' "released"
events are recorded by ``cache.release(layer, needed)`` after the batched kernels are queued, so
no copy overwrites a slot under them. (Slots are never reused inside the layer: the block batches
only when the layer's experts fit its slots together, and then the cache issues every miss into a
slot no needed expert holds.)
"""
from __future__ import annotations

import torch

from .compute import TOLERANCE
from .graphs import OneTokenGraphs


class BatchedExperts:
    """Runs one layer's selected experts on one token as one computation (one per MoE block)."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.compute = getattr(fmt, "compute", None)
        self.graphs = OneTokenGraphs(self.compute) if self.compute is not None else None
        self.addrs: dict[int, torch.Tensor] = {}      # n -> static device address table (graph input)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """Low-bit experts where Triton runs: CUDA, or the CPU under Triton's interpreter when the
        model forces kernels="triton" (the CPU tests)."""
        from ..quant import grouped
        from ..quant.format import QuantizedExpertFormat
        fmt, compute = self.fmt, self.compute
        if not isinstance(fmt, QuantizedExpertFormat) or compute is None or not compute.triton_on:
            return False
        where = x.is_cuda or (compute.kernels == "triton" and grouped.K.interpreting())
        return (where and "grouped_experts" not in compute.fallbacks and grouped.available(x)
                and grouped.supports(fmt))

    def __call__(self, views_list: list, x: torch.Tensor) -> torch.Tensor:
        """x [1, H] -> [n, 1, H], expert j = views_list[j]."""
        if not self.grouped_ok(x):
            return self.one_by_one(views_list, x)
        try:
            key = (str(x.device), x.dtype, len(views_list))
            if key not in self.compute.tested:
                y = self._grouped(views_list, x)
                self._check(key, y, views_list, x)
                return y
            return self._grouped(views_list, x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:          # a compile or launch failure on this GPU / Triton
            self.compute.fall_back("grouped_experts", f"{type(e).__name__}: {str(e).strip()[:300]}",
                                   "a layer's experts run one call per expert (more launches per token)")
            return self.one_by_one(views_list, x)

    def one_by_one(self, views_list, x) -> torch.Tensor:
        return torch.stack([self.fmt.forward(v, x) for v in views_list])

    def _grouped(self, views_list, x) -> torch.Tensor:
        from ..quant import grouped
        fmt = self.fmt
        host = grouped.buffer_addresses(fmt, views_list)
        biases = grouped.expert_biases(views_list, x.dtype)
        if biases is not None:          # bias views move with the experts: no graph over them
            return grouped.grouped_expert_forward(fmt, host.to(x.device, non_blocking=True), x, biases)
        n = len(views_list)
        addrs = self.addrs.get(n)
        if addrs is None or addrs.device != x.device:
            addrs = self.addrs[n] = torch.empty(n, dtype=torch.int64, device=x.device)
        addrs.copy_(host, non_blocking=True)
        # one CUDA graph per layer and expert count: it reads the experts through ``addrs``
        return self.graphs.run(("grouped", n), lambda xs: grouped.grouped_expert_forward(fmt, addrs, xs), x)

    def _check(self, key, y, views_list, x) -> None:
        """The first grouped call against one call per expert (fp32 reference tolerance)."""
        ref = self.one_by_one(views_list, x)
        err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
        tol = TOLERANCE[x.dtype]
        self.compute.tested[key] = "ok" if err < tol else f"relative error {err:.3g}"
        if not err < tol:
            raise RuntimeError(f"grouped experts differ from one call per expert: relative error {err:.3g} "
                               f"(tolerance {tol:g})")
