"""HostSync: the one host synchronisation of a layer (which experts did the router pick?).

The host must learn the router's choice before it can issue copies, so every MoE layer waits for
the device once. ``HostSync.read(*tensors)`` gathers small integer tensors (expert ids, counts,
the next layer's guesses) with conversion kernels into a small int32 buffer, waits for one event,
and returns them as one Python list.

    mode "mapped"  the buffer is pinned host memory mapped into the device's address space: the
                   kernels' writes land on the host, no copy to issue (falls back to "copy"
                   where this CUDA/torch cannot map it)
    mode "copy"    a device buffer, then one small copy into pinned memory

We suspected that a memcpy on the compute stream would queue behind the 60 MB expert copies; an
H200 trace showed it does not (docs/benchmark_notes.md), and both measured the same there.
On CPU it is a plain ``tolist()``.
"""
from __future__ import annotations

import torch


def mapped_device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor aliasing pinned ``host`` memory (zero-copy: kernels write straight to the
    host), or None where this CUDA/torch cannot map it. Checked by a write before it is trusted."""
    try:
        class _Interface:          # CUDA's array interface: how torch adopts foreign device memory
            __cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "<i4", "version": 2,
                                        "data": (host.data_ptr(), False), "strides": None}
        view = torch.as_tensor(_Interface(), device=device)
        view.fill_(-7)
        torch.cuda.synchronize(device)
        if not bool((host == -7).all()):
            return None
        host.zero_()
        return view
    except Exception:
        return None


class HostSync:
    def __init__(self, device: torch.device, mode: str = "mapped"):
        if mode not in ("mapped", "copy"):
            raise ValueError(f"host_sync must be 'mapped' or 'copy', got {mode!r}")
        self.device, self.mode = torch.device(device), mode
        self.cuda = self.device.type == "cuda"
        self._host = None               # pinned int32 landing buffer
        self._stage = None              # what the kernels write: a mapped view of _host, or a device buffer
        self.mapped = False
        self._done = torch.cuda.Event() if self.cuda else None

    def read(self, *tensors: torch.Tensor, while_waiting=None) -> list[int]:
        """Small integer tensors, concatenated, as one list. ``while_waiting()`` is called while
        the host waits for the device (the cache issues speculative copies then)."""
        if not self.cuda:
            return [v for t in tensors for v in t.reshape(-1).tolist()]
        n = sum(t.numel() for t in tensors)
        stage = self._staging(n)
        o = 0
        for t in tensors:
            src = t.reshape(-1)
            if src.dtype == stage.dtype:          # a same-dtype copy would be a memcpy
                src = src.long()
            stage[o:o + src.numel()].copy_(src)
            o += src.numel()
        if not self.mapped:
            self._host[:n].copy_(stage[:n], non_blocking=True)
        self._done.record(torch.cuda.current_stream(self.device))
        if while_waiting is not None:
            while not self._done.query():
                while_waiting()
        self._done.synchronize()
        return self._host[:n].tolist()

    def _staging(self, n: int) -> torch.Tensor:
        if self._host is None or self._host.numel() < n:
            self._host = torch.empty(max(n, 256), dtype=torch.int32, pin_memory=True)
            self._stage = mapped_device_view(self._host, self.device) if self.mode == "mapped" else None
            self.mapped = self._stage is not None
            if self._stage is None:
                self._stage = torch.empty(self._host.numel(), dtype=torch.int32, device=self.device)
        return self._stage
