"""The expert cache: per layer, a few device slots holding experts, LRU eviction, async copies.

    layer l:  slots uint8 [experts_on_device, nbytes] on the compute device
              lru: {expert -> slot}, least recently used first

On CUDA every copy runs on one dedicated copy stream and is ordered with two events per slot:

    ready     recorded on the copy stream after the copy into the slot;
              the compute stream waits on it before reading the slot
    released  recorded on the compute stream after the last kernel that read the slot;
              the copy stream waits on it before overwriting the slot

so compute never reads a half-written slot and a slot is never overwritten under a kernel.
In swap mode an evicted expert that has no host copy left is written back on a third stream
(device -> host: PCIe is full duplex and GPUs have a copy engine per direction), from a slot
that then joins a small pool of spare slots; the load that needed the room goes into a spare
slot at once, so a demand load never waits for a write-back. Per host row, two more events
order a write-back into the row after any load still reading it, and a load after the
write-back that filled it. On CPU the same code runs with plain synchronous copies.

Speculative copies never go before demand copies: guesses wait in a host-side queue and one is
issued only when the copy stream is idle (checked between expert computations and while the
host waits for the device); when the next layer's real experts are known, the guesses not
issued yet are dropped. A guess is also dropped when the next layer's router thinks it no more
likely than the expert it would evict, or below ``min_prob``.

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

from collections import OrderedDict, deque
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
    __slots__ = ("buffer", "views", "expert", "prefetched", "ready", "released", "free")

    def __init__(self, buffer: torch.Tensor, views: dict, events: bool):
        self.buffer, self.views = buffer, views
        self.expert: int | None = None
        self.prefetched = False
        self.ready = torch.cuda.Event() if events else None      # copy in done (copy stream)
        self.released = torch.cuda.Event() if events else None   # last read done (compute stream)
        self.free = torch.cuda.Event() if events else None       # write-back out done (spare slots)


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
                 reuse: bool = True, host_sync: str = "mapped", events=None, spare_slots: int = 0,
                 min_prob: float = 0.0):
        self.store, self.device = store, torch.device(device)
        self.events = events if events is not None else NoEvents()     # engine/events.py
        self.experts_on_device = experts_on_device
        self.min_prob = min_prob
        if not reuse and store.swap:
            raise ValueError("reuse=False (no cache) needs copy mode: in swap mode a slot holds the only "
                             "copy of its expert")
        self.policy = KeepResident() if reuse else ForgetResident()
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.writeback_stream = torch.cuda.Stream(self.device) if self.cuda and store.swap else None
        self._copied = torch.cuda.Event() if self.cuda else None   # after the last host -> device copy
        self.host_sync = HostSync(self.device, host_sync)
        layout = store.format.layout
        spare_slots = spare_slots if store.swap else 0
        self.slot_memory = [torch.empty(experts_on_device, store.nbytes, dtype=torch.uint8, device=self.device)
                            for _ in range(store.num_layers)]
        self.layers = [LayerCache([Slot(mem[i], layout.views(mem[i]), self.cuda) for i in range(experts_on_device)])
                       for mem in self.slot_memory]
        self.spare: deque[Slot] = deque()        # swap mode: slots any layer's load may take
        if spare_slots:
            mem = torch.empty(spare_slots, store.nbytes, dtype=torch.uint8, device=self.device)
            self.slot_memory.append(mem)
            self.spare.extend(Slot(mem[i], layout.views(mem[i]), self.cuda) for i in range(spare_slots))
        # per host row: a load still reading it, a write-back filling it (swap mode, CUDA)
        self._row_read = [[None] * b.shape[0] for b in store.buffers]
        self._row_written = [[None] * b.shape[0] for b in store.buffers]
        # the speculative queue: guesses of one layer not issued yet, their scores, what they protect
        self._pending: deque[int] = deque()
        self._pending_layer = -1
        self._pending_scores: list[float] | None = None
        self._protected: set = set()
        self._demand_waiting = False
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
        values = self.host_sync.read(*tensors, while_waiting=self._pump)
        self.events.finish(ev, stream)
        return values

    # -- the two entry points used by the MoE block ----------------------------------------
    def experts(self, layer: int, needed: list[int], prefetch: list[int] | None = None,
                prefetch_scores: list[float] | None = None, hold: bool = False) -> Iterator[tuple[int, dict]]:
        """Yield ``(expert, views)`` once for each needed expert, as soon as it is on the device:
        resident experts first, then each miss when its copy lands. ``prefetch``: guessed experts
        of layer + 1 (``prefetch_scores``: the next router's probability of every expert), queued
        behind this layer's own copies (see prefetch()).

        An expert is evicted only after it computed, so with fewer slots than needed experts the
        slots are reused in waves. The caller computes with ``views`` before asking for the next
        expert; close the generator (contextlib.closing) if that computation can fail.
        ``hold=True``: the caller computes after collecting every expert (one batched call; the
        needed experts must fit the slots together) and then calls ``release(layer, needed)``:
        no copy overwrites their slots before the compute queued by then.
        """
        lc = self.layers[layer]
        if self._pending_layer == layer:        # the real experts are known: drop unissued guesses
            self._pending.clear()
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
        try:
            self._issue(layer, misses, remaining, ready)
            if prefetch:
                self.prefetch(layer + 1, prefetch, prefetch_scores)
            for expert in ready:                                   # grows while misses are issued
                slot = lc.lru[expert]
                lc.lru.move_to_end(expert)
                stream = torch.cuda.current_stream(self.device) if self.cuda else None
                if self.cuda:
                    stream.wait_event(slot.ready)
                ev = self.events.begin("compute", layer, expert, stream=stream)
                try:
                    yield expert, slot.views
                finally:        # also when the caller stops early: its kernels may read the slot
                    self.events.finish(ev, stream)
                    if self.cuda and not hold:
                        slot.released.record(stream)
                remaining.discard(expert)
                self._issue(layer, misses, remaining, ready)
                self._pump()
        finally:
            self._demand_waiting = False
        assert not misses and not remaining, (misses, remaining)

    def release(self, layer: int, experts: list[int]) -> None:
        """After ``experts(..., hold=True)``: the compute queued so far is the last to read these
        experts' slots (their "released" events are recorded now)."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            lc = self.layers[layer]
            for e in experts:
                lc.lru[e].released.record(stream)

    def prefetch(self, layer: int, guesses: list[int], scores: list[float] | None = None) -> None:
        """Queue guessed experts of ``layer`` (most likely first) for speculative loading. A guess
        never evicts another guess of this round (resident or in flight), so a prefetch cannot
        undo itself; with ``scores`` (the router's probability of each expert of ``layer``) a
        guess is dropped when it is below ``min_prob`` or no more likely than its victim."""
        self._pending_layer = layer
        self._pending = deque(guesses)
        self._pending_scores = scores
        self._protected = set(guesses)
        self._pump()

    def _pump(self) -> None:
        """Issue queued guesses while no demand copy waits and the copy stream is idle."""
        while self._pending and not self._demand_waiting and self._copy_idle():
            expert = self._pending.popleft()
            layer = self._pending_layer
            lc = self.layers[layer]
            if expert in lc.lru:
                continue
            slot = lc.victim(self._protected)
            if slot is None:
                self._pending.clear()
                return
            p = self._pending_scores
            if p is not None and (p[expert] < self.min_prob or
                                  (slot.expert is not None and p[expert] <= p[slot.expert])):
                continue
            self._load(layer, slot, expert, prefetched=True)
            lc.stats.prefetches += 1

    def _copy_idle(self) -> bool:
        return not self.cuda or self._copied.query()

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
                self._demand_waiting = True          # a wave: misses wait for a slot to free up
                return
            expert = misses.pop(0)
            self._load(layer, slot, expert, prefetched=False)
            issued.append(expert)
        self._demand_waiting = False

    def _load(self, layer: int, slot: Slot, expert: int, prefetched: bool) -> None:
        """Copy ``expert`` into the layer's ``slot`` (evicting what it holds); in swap mode an
        evicted expert without a host copy is written back, and if a spare slot is ready the
        load goes there at once while the victim's slot is written back and becomes spare."""
        lc, store = self.layers[layer], self.store
        old = slot.expert
        if old is not None:
            if slot.prefetched:
                lc.stats.prefetch_wasted += 1
            del lc.lru[old]
            # Forget the old expert before any copy starts: an interrupt from here on leaves an
            # empty slot, never a slot that claims an expert it does not hold.
            slot.expert = None
            if store.swap and store.home[layer][old] is None:
                target = self.spare.popleft() if self.spare else None
                self._write_back(layer, old, slot)
                if target is not None:      # the load takes a spare slot; the victim's slot becomes spare
                    lc.slots[lc.slots.index(slot)] = target
                    self.spare.append(slot)
                    slot = target
                elif self.cuda:             # no spare slot: this load waits for the write-back
                    self.copy_stream.wait_event(slot.free)
        if self.cuda:
            self.copy_stream.wait_event(slot.released)
            if slot.free is not None:
                self.copy_stream.wait_event(slot.free)
        row = store.home[layer][expert]
        if self.cuda and self._row_written[layer][row] is not None:
            self.copy_stream.wait_event(self._row_written[layer][row])
        self._copy(slot.buffer, store.buffers[layer][row], "prefetch" if prefetched else "load", layer, expert,
                   self.copy_stream)
        if self.cuda:
            slot.ready.record(self.copy_stream)
            self._copied.record(self.copy_stream)
            self._row_read[layer][row] = _recorded(self._row_read[layer][row], self.copy_stream)
        slot.expert, slot.prefetched = expert, prefetched
        lc.lru[expert] = slot
        lc.stats.bytes_to_device += store.nbytes

    def _write_back(self, layer: int, expert: int, slot: Slot) -> None:
        """Swap mode: copy ``expert`` (only on the device, in ``slot``) into a host row, on the
        write-back stream, after the compute that last read the slot and any load still reading
        the row; ``slot.free`` marks the end."""
        lc, store = self.layers[layer], self.store
        row = store.row_for_writeback(layer, reversed(list(lc.lru)))
        stream = self.writeback_stream
        if self.cuda:
            stream.wait_event(slot.released)
            if self._row_read[layer][row] is not None:
                stream.wait_event(self._row_read[layer][row])
        self._copy(store.buffers[layer][row], slot.buffer, "writeback", layer, expert, stream)
        if self.cuda:
            slot.free.record(stream)
            self._row_written[layer][row] = _recorded(self._row_written[layer][row], stream)
        store.place(layer, expert, row)
        lc.stats.bytes_to_host += store.nbytes

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, layer: int, expert: int, stream) -> None:
        ev = self.events.begin(kind, layer, expert, dst.numel(), stream=stream)
        if self.cuda:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)
        self.events.finish(ev, stream)

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


def _recorded(event, stream):
    """``event`` (created if None) recorded on ``stream`` now."""
    event = event if event is not None else torch.cuda.Event()
    event.record(stream)
    return event
