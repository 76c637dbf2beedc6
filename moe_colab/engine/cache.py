"""The expert cache: per layer, a few device slots holding experts, LRU eviction, async copies.

    layer l:  slots uint8 [experts_on_device, nbytes] on the compute device
              lru: {expert -> slot}, least recently used first

On CUDA every copy runs on one dedicated copy stream and is ordered with two events per slot:

    ready     recorded on the copy stream after the copy into the slot;
              the compute stream waits on it before reading the slot
    released  recorded on the compute stream after the last kernel that read the slot;
              the copy stream waits on it before overwriting the slot

so compute never reads a half-written slot and a slot is never overwritten under a kernel.
On CPU the same code runs with plain synchronous copies.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.1 (LRU caching) and 3.2 (speculative
expert loading).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .storage import ExpertStore


@dataclass
class LayerStats:
    hits: int = 0              # expert needed and already resident (or already on its way)
    misses: int = 0            # expert needed and loaded on demand
    prefetch_hits: int = 0     # of the hits: resident because a prefetch brought it
    prefetches: int = 0        # experts loaded speculatively
    prefetch_wasted: int = 0   # prefetched experts evicted before any use
    bytes_to_device: int = 0   # bytes copied host -> device, demand and prefetch
    bytes_to_host: int = 0     # bytes copied back device -> host (swap mode only)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


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


class Slot:
    __slots__ = ("index", "buffer", "views", "expert", "prefetched", "ready", "released")

    def __init__(self, index: int, buffer: torch.Tensor, views: dict, events: bool):
        self.index, self.buffer, self.views = index, buffer, views
        self.expert: int | None = None
        self.prefetched = False
        self.ready = torch.cuda.Event() if events else None
        self.released = torch.cuda.Event() if events else None


class LayerCache:
    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.lru: OrderedDict[int, Slot] = OrderedDict()
        self.stats = LayerStats()

    def victim(self, protected) -> Slot | None:
        """An empty slot, else the least recently used one whose expert is not protected."""
        for slot in self.slots:
            if slot.expert is None:
                return slot
        for expert, slot in self.lru.items():
            if expert not in protected:
                return slot
        return None


class ExpertCache:
    """``experts_on_device`` slots per layer in front of an ExpertStore in host memory."""

    def __init__(self, store: ExpertStore, experts_on_device: int, device: torch.device):
        self.store, self.device = store, torch.device(device)
        self.experts_on_device = experts_on_device
        # reuse=False turns the cache off (every use is a miss): the "no cache" ablation row.
        self.reuse = True
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host_ints = None                                   # pinned landing buffer, see to_host
        self._stage, self._mapped = None, False
        self.mapped_sync = True                                  # False: always copy (benchmarks)
        self._to_host_done = torch.cuda.Event() if self.cuda else None
        layout = store.format.layout
        self.slot_memory = [torch.empty(experts_on_device, store.nbytes, dtype=torch.uint8, device=self.device)
                            for _ in range(store.num_layers)]
        self.layers = [LayerCache([Slot(i, mem[i], layout.views(mem[i]), self.cuda)
                                   for i in range(experts_on_device)])
                       for mem in self.slot_memory]
        if store.swap:
            # In swap mode the experts without a host row start in the first slots.
            for l, lc in enumerate(self.layers):
                for e, home in enumerate(store.home[l]):
                    if home is None:
                        slot = lc.slots[len(lc.lru)]
                        slot.expert = e
                        lc.lru[e] = slot

    def write(self, layer: int, expert: int, name: str, weight: torch.Tensor) -> None:
        """Load one original expert matrix wherever that expert lives (host row or slot)."""
        lc = self.layers[layer]
        views = lc.lru[expert].views if self.store.home[layer][expert] is None else None
        self.store.write(layer, expert, name, weight, views=views)

    def write_packed(self, layer: int, expert: int, buffer: torch.Tensor) -> None:
        """Load one expert already packed in this format (a quantized directory's buffers)."""
        if buffer.shape != (self.store.nbytes,) or buffer.dtype != torch.uint8:
            raise ValueError(f"packed expert buffer is {tuple(buffer.shape)} {buffer.dtype}, the format "
                             f"needs ({self.store.nbytes},) uint8")
        lc = self.layers[layer]
        on_device = self.store.home[layer][expert] is None
        (lc.lru[expert].buffer if on_device else self.store.buffer(layer, expert)).copy_(buffer)
        self.store.written[layer][expert].update(("w1", "w2", "w3"))

    def to_host(self, *tensors: torch.Tensor) -> list[int]:
        """Small integer tensors, concatenated, as one list: the one host sync of a layer.

        The values are gathered by conversion kernels (int64 -> int32) into a small buffer the
        host reads after one event wait: pinned host memory mapped into the device's address
        space where CUDA allows it (the kernels' writes land on the host: no copy to issue),
        else a device buffer and one small copy into pinned memory. We suspected that a memcpy
        on the compute stream would queue behind the 60 MB expert copies; an H200 trace showed
        it does not (docs/benchmark_notes.md), and both variants measured the same there.
        """
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
        if not self._mapped:
            self._host_ints[:n].copy_(stage[:n], non_blocking=True)
        self._to_host_done.record(torch.cuda.current_stream(self.device))
        self._to_host_done.synchronize()
        return self._host_ints[:n].tolist()

    def _staging(self, n: int) -> torch.Tensor:
        if self._host_ints is None or self._host_ints.numel() < n:
            self._host_ints = torch.empty(max(n, 256), dtype=torch.int32, pin_memory=True)
            self._stage = None
            if self.mapped_sync:
                self._stage = mapped_device_view(self._host_ints, self.device)
            self._mapped = self._stage is not None
            if self._stage is None:
                self._stage = torch.empty(self._host_ints.numel(), dtype=torch.int32, device=self.device)
        return self._stage

    # -- copies ---------------------------------------------------------------------------
    def _load(self, layer: int, slot: Slot, expert: int, prefetched: bool) -> None:
        lc, store = self.layers[layer], self.store
        if self.cuda:
            self.copy_stream.wait_event(slot.released)
        if slot.expert is not None:
            old = slot.expert
            if slot.prefetched:
                lc.stats.prefetch_wasted += 1
            if store.swap and store.home[layer][old] is None:
                # Swap mode: the slot holds the only copy; put it back in the spare host row
                # first (same stream, so the copy in below waits for it).
                row = store.free_row(layer)
                self._copy(store.buffers[layer][row], slot.buffer)
                store.home[layer][old] = row
                lc.stats.bytes_to_host += store.nbytes
            del lc.lru[old]
            # Forget the old expert before the copy starts: an interrupt from here on leaves an
            # empty slot, never a slot that claims an expert it does not hold.
            slot.expert = None
        self._copy(slot.buffer, store.buffer(layer, expert))
        if self.cuda:
            slot.ready.record(self.copy_stream)
        slot.expert, slot.prefetched = expert, prefetched
        lc.lru[expert] = slot
        if store.swap:
            store.home[layer][expert] = None     # its host row is the spare now
        lc.stats.bytes_to_device += store.nbytes

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)

    # -- the two entry points used by the MoE block ----------------------------------------
    def run_layer(self, layer: int, needed: list[int], compute: Callable[[int, dict], None],
                  after_issue: Callable[[], None] | None = None) -> None:
        """Make each needed expert resident and call ``compute(expert, views)`` once for each.

        Resident experts compute first while the missing ones are copied; with fewer slots than
        needed experts, slots are reused in waves (an expert is evicted only after it computed).
        ``after_issue`` runs once the first copies are queued (the MoE block starts its prefetch
        for the next layer there, so those copies queue behind this layer's own).
        """
        lc = self.layers[layer]
        if not self.reuse:
            if self.store.swap:
                raise RuntimeError("reuse=False (no cache) needs copy mode: in swap mode a slot "
                                   "holds the only copy of its expert")
            for slot in lc.slots:
                if slot.expert is not None:
                    del lc.lru[slot.expert]
                    slot.expert, slot.prefetched = None, False
        remaining = set(needed)
        hits = [e for e in needed if e in lc.lru]
        misses = [e for e in needed if e not in lc.lru]
        lc.stats.hits += len(hits)
        lc.stats.misses += len(misses)
        for e in hits:
            slot = lc.lru[e]
            if slot.prefetched:
                lc.stats.prefetch_hits += 1
                slot.prefetched = False
        in_flight: list[int] = []

        def issue() -> None:
            while misses:
                slot = lc.victim(remaining)
                if slot is None:
                    return
                expert = misses.pop(0)
                self._load(layer, slot, expert, prefetched=False)
                in_flight.append(expert)

        def run(expert: int) -> None:
            slot = lc.lru[expert]
            lc.lru.move_to_end(expert)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
            compute(expert, slot.views)
            if self.cuda:
                slot.released.record(torch.cuda.current_stream(self.device))
            remaining.discard(expert)

        issue()
        if after_issue is not None:
            after_issue()
        for e in hits:
            run(e)
            issue()
        while in_flight:
            run(in_flight.pop(0))
            issue()
        assert not misses and not remaining, (misses, remaining)

    def prefetch(self, layer: int, guesses: list[int]) -> None:
        """Start loading guessed experts of ``layer``; never evicts another guess of this round
        (resident or in flight), so a prefetch cannot undo itself."""
        lc = self.layers[layer]
        protected = set(guesses)
        for expert in guesses:
            if expert in lc.lru:
                continue
            slot = lc.victim(protected)
            if slot is None:
                return
            self._load(layer, slot, expert, prefetched=True)
            lc.stats.prefetches += 1

    def resident(self, layer: int) -> list[int]:
        """Experts of ``layer`` on the device, least recently used first."""
        return list(self.layers[layer].lru)

    # -- statistics -----------------------------------------------------------------------
    def stats(self, per_layer: bool = False) -> dict:
        names = [f.name for f in fields(LayerStats)]
        total = {n: sum(getattr(lc.stats, n) for lc in self.layers) for n in names}
        if per_layer:
            total["per_layer"] = [{n: getattr(lc.stats, n) for n in names} for lc in self.layers]
        return total

    def reset_stats(self) -> None:
        """Zero every counter. Prefetches still pending count as plain loads from now on, so
        that prefetch_hits and prefetch_wasted only ever refer to prefetches counted here."""
        for lc in self.layers:
            lc.stats.reset()
            for slot in lc.slots:
                slot.prefetched = False

    def clear(self) -> None:
        """Empty every slot (the next use of any expert is a miss). Copy mode only."""
        if self.store.swap:
            raise RuntimeError("clear() would drop experts whose only copy is on the device (swap mode)")
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for lc in self.layers:
            lc.lru.clear()
            for slot in lc.slots:
                slot.expert, slot.prefetched = None, False

    @property
    def device_bytes(self) -> int:
        return sum(m.numel() for m in self.slot_memory)
