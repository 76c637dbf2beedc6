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

The MoE block drives a layer with one generator, as the paper's code does:

    with closing(cache.experts(layer, needed, prefetch=guesses)) as ready:
        for expert, views in ready:         # hits first, then each miss as its copy lands
            outputs[expert] = fmt.forward(views, x)

The cache issues this layer's misses, then the speculative copies for layer + 1 (so they queue
behind), and evicts an expert only after it computed (in waves when slots are fewer than the
experts needed). Closing the generator early (an exception in compute) leaves it consistent.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.1 (LRU caching) and 3.2 (speculative
expert loading).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from .events import NoEvents
from .hostsync import HostSync
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

    def forget(self) -> None:
        """Drop every resident expert from the books (its bytes stay until overwritten)."""
        for slot in self.slots:
            if slot.expert is not None:
                del self.lru[slot.expert]
                slot.expert, slot.prefetched = None, False


class KeepResident:
    """The cache proper: resident experts stay until the LRU rule evicts them."""

    def begin(self, lc: LayerCache) -> None:
        pass


class ForgetResident:
    """No cache (the benchmark's "no cache" row, ``reuse=False``): every use is a miss."""

    def begin(self, lc: LayerCache) -> None:
        lc.forget()


class ExpertCache:
    """``experts_on_device`` slots per layer in front of an ExpertStore in host memory."""

    def __init__(self, store: ExpertStore, experts_on_device: int, device: torch.device, *,
                 reuse: bool = True, host_sync: str = "mapped", events=None):
        self.store, self.device = store, torch.device(device)
        self.events = events if events is not None else NoEvents()     # engine/events.py
        self.experts_on_device = experts_on_device
        if not reuse and store.swap:
            raise ValueError("reuse=False (no cache) needs copy mode: in swap mode a slot holds the only "
                             "copy of its expert")
        self.policy = KeepResident() if reuse else ForgetResident()
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_sync = HostSync(self.device, host_sync)
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

    def sync(self, *tensors: torch.Tensor, layer: int = -1) -> list[int]:
        """The layer's one host synchronisation: small integer tensors as one list (hostsync.py)."""
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        ev = self.events.begin("sync", layer, stream=stream)
        values = self.host_sync.read(*tensors)
        self.events.finish(ev, stream)
        return values

    # -- the two entry points used by the MoE block ----------------------------------------
    def experts(self, layer: int, needed: list[int], prefetch: list[int] | None = None
                ) -> Iterator[tuple[int, dict]]:
        """Yield ``(expert, views)`` once for each needed expert, as soon as it is on the device:
        resident experts first, then each miss when its copy lands. ``prefetch``: guessed experts
        of layer + 1, queued right after this layer's first copies (never before them).

        An expert is evicted only after it computed, so with fewer slots than needed experts the
        slots are reused in waves. The caller computes with ``views`` before asking for the next
        expert; close the generator (contextlib.closing) if that computation can fail.
        """
        lc = self.layers[layer]
        self.policy.begin(lc)
        remaining = set(needed)
        ready = [e for e in needed if e in lc.lru]            # hits, then misses as issued
        misses = [e for e in needed if e not in lc.lru]
        lc.stats.hits += len(ready)
        lc.stats.misses += len(misses)
        for e in ready:
            slot = lc.lru[e]
            if slot.prefetched:
                lc.stats.prefetch_hits += 1
                slot.prefetched = False
        self._issue(layer, misses, remaining, ready)
        if prefetch:
            self.prefetch(layer + 1, prefetch)
        for expert in ready:                                   # grows while misses are issued
            slot = lc.lru[expert]
            lc.lru.move_to_end(expert)
            stream = torch.cuda.current_stream(self.device) if self.cuda else None
            if self.cuda:
                stream.wait_event(slot.ready)
            ev = self.events.begin("compute", layer, expert, stream=stream)
            try:
                yield expert, slot.views
            finally:            # also when the caller stops early: its kernels may read the slot
                self.events.finish(ev, stream)
                if self.cuda:
                    slot.released.record(stream)
            remaining.discard(expert)
            self._issue(layer, misses, remaining, ready)
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

    # -- copies ---------------------------------------------------------------------------
    def _issue(self, layer: int, misses: list[int], remaining: set, issued: list[int]) -> None:
        """Copy misses, in order, into slots this step no longer needs; append each to ``issued``."""
        lc = self.layers[layer]
        while misses:
            slot = lc.victim(remaining)
            if slot is None:
                return
            expert = misses.pop(0)
            self._load(layer, slot, expert, prefetched=False)
            issued.append(expert)

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
                self._copy(store.buffers[layer][row], slot.buffer, "writeback", layer, old)
                store.home[layer][old] = row
                lc.stats.bytes_to_host += store.nbytes
            del lc.lru[old]
            # Forget the old expert before the copy starts: an interrupt from here on leaves an
            # empty slot, never a slot that claims an expert it does not hold.
            slot.expert = None
        self._copy(slot.buffer, store.buffer(layer, expert), "prefetch" if prefetched else "load", layer, expert)
        if self.cuda:
            slot.ready.record(self.copy_stream)
        slot.expert, slot.prefetched = expert, prefetched
        lc.lru[expert] = slot
        if store.swap:
            store.home[layer][expert] = None     # its host row is the spare now
        lc.stats.bytes_to_device += store.nbytes

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, layer: int, expert: int) -> None:
        ev = self.events.begin(kind, layer, expert, dst.numel(), stream=self.copy_stream)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)
        self.events.finish(ev, self.copy_stream)

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
            lc.forget()

    @property
    def device_bytes(self) -> int:
        return sum(m.numel() for m in self.slot_memory)
