"""Expert storage: every expert's tensors packed into ONE contiguous byte buffer.

Moving an expert between host and device is then a single copy of ``layout.nbytes`` bytes,
whatever the expert holds: three 16-bit matrices here, or low-bit codes with their scales and
zeros (``moe_colab.quant.format``). A format describes the bytes (``layout``), turns original
weights into named tensors (``pack``) and computes the expert from views of a buffer
(``forward``).

    host:   ExpertStore.buffers[layer]       uint8 [num_experts, nbytes]  (pinned on CUDA)
    device: ExpertCache slots (cache.py)     uint8 [experts_on_device, nbytes]

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.3 ("one host-to-device copy").
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

ALIGN = 64  # bytes; keeps every view aligned for any dtype and for vectorised kernel loads


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the buffer

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class Views(dict):
    """name -> typed view into one expert buffer. ``cached`` holds what a format derives from
    these views once (checked matrices, CUDA graphs): it lives and dies with the slot's views."""
    __slots__ = ("cached",)


class PackedLayout:
    """Where each named tensor sits inside one expert's byte buffer."""

    def __init__(self, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        specs, offset = [], 0
        for name, shape, dtype in entries:
            spec = TensorSpec(name, tuple(int(s) for s in shape), dtype, offset)
            specs.append(spec)
            offset += -(-spec.nbytes // ALIGN) * ALIGN
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        self.nbytes: int = offset

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}{list(s.shape)}:{str(s.dtype)[6:]}@{s.offset}" for s in self.specs)
        return f"PackedLayout({inner}; {self.nbytes} bytes)"

    def views(self, buf: torch.Tensor) -> Views:
        """Typed views into a uint8 buffer of ``nbytes`` (no copy)."""
        assert buf.dtype == torch.uint8 and buf.numel() == self.nbytes, (buf.dtype, buf.numel(), self.nbytes)
        return Views((s.name, buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)) for s in self.specs)

    def pack_into(self, buf: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Copy named tensors into their places in ``buf``; shapes and dtypes must match."""
        views = self.views(buf)
        missing = set(views) - set(tensors)
        if missing:
            raise KeyError(f"tensors missing for this layout: {sorted(missing)}")
        for name, view in views.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(view.shape) or t.dtype != view.dtype:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, layout wants "
                                 f"{tuple(view.shape)} {view.dtype}")
            view.copy_(t)


class ExpertFormat(Protocol):
    """What the cache and the MoE block need to know about how an expert is stored."""

    layout: PackedLayout

    def write(self, views: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> None:
        """Store one original matrix (``name`` in w1, w3: [I, H]; w2: [H, I]) into an expert's
        buffer views; called once per matrix, so the loader holds one tensor at a time."""

    def forward(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [tokens, H] -> expert output [tokens, H], from views of a (device) buffer."""


class DenseExpertFormat:
    """The unquantized expert: w1 and w3 fused as ``w13`` [2I, H] (the layout transformers >= 5
    uses in ``MixtralExperts.gate_up_proj``, so the arithmetic is the same), and w2 [H, I]."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, act=F.silu):
        self.hidden, self.intermediate, self.dtype, self.act = hidden, intermediate, dtype, act
        self.layout = PackedLayout([
            ("w13", (2 * intermediate, hidden), dtype),
            ("w2", (hidden, intermediate), dtype),
        ])

    def write(self, views, name, weight):
        i = self.intermediate
        dst = {"w1": views["w13"][:i], "w3": views["w13"][i:], "w2": views["w2"]}[name]
        if tuple(weight.shape) != tuple(dst.shape):
            raise ValueError(f"expert weight {name} has shape {tuple(weight.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(weight)

    def forward(self, views, x):
        gate, up = F.linear(x, views["w13"]).chunk(2, dim=-1)   # [T, I] each
        return F.linear(self.act(gate) * up, views["w2"])      # [T, H]


def pinned_empty(rows: int, nbytes: int, pin: bool) -> torch.Tensor:
    """uint8 [rows, nbytes] in host memory, page-locked when ``pin``.

    torch's pinned allocator (``pin_memory=True``) rounds every block up to a power of two: a
    274 MiB layer of 3-bit experts would take 512 MiB of Colab's 12.7 GB. So allocate ordinary
    memory and page-lock exactly that with cudaHostRegister; fall back to torch's allocator if
    registration fails.
    """
    if not pin:
        return torch.empty(rows, nbytes, dtype=torch.uint8)
    t = torch.empty(rows, nbytes, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0 or not t.is_pinned():
        return torch.empty(rows, nbytes, dtype=torch.uint8, pin_memory=True)
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class ExpertStore:
    """All experts of all layers in host memory, one uint8 row per expert.

    ``buffers[layer]`` is uint8 [rows, nbytes]; it is pinned when the compute device is CUDA so
    that host-to-device copies are asynchronous and run at full PCIe speed.

    Two modes:
      copy (device_first=0)  rows = E: every expert always has a host copy; a device slot holds
                             a second copy, so evicting one costs nothing
      swap (device_first=k)  rows = E - k + 1 (+ ``extra_rows``, spread over the layers): host
                             memory for about (E - k)/E of the experts, what a 12.7 GB Colab
                             needs. Experts 0..k-1 start on the device. An expert loaded to the
                             device keeps its row as a valid copy until that row is needed for
                             another expert's write-back; evicting an expert that still has its
                             row costs nothing, evicting one without copies it back first
    ``home[layer][expert]`` is the row holding a valid copy of the expert, or None while only
    the device has it; ``owner[layer][row]`` the expert a row holds, or None (a free row).
    """

    def __init__(self, num_layers: int, num_experts: int, fmt: ExpertFormat, pin: bool,
                 device_first: int = 0, extra_rows: int = 0):
        self.num_layers, self.num_experts, self.format = num_layers, num_experts, fmt
        self.nbytes = fmt.layout.nbytes
        self.swap = device_first > 0
        if extra_rows < 0 or (extra_rows and not self.swap):
            raise ValueError(f"extra_rows={extra_rows}: only swap mode takes extra host rows")
        base = num_experts - device_first + 1 if self.swap else num_experts
        # extra rows, one per layer round-robin, never more than copy mode's E rows per layer
        rows = [min(num_experts, base + extra_rows // num_layers + (l < extra_rows % num_layers))
                for l in range(num_layers)]
        self.buffers = [pinned_empty(r, self.nbytes, pin) for r in rows]
        self.home: list[list[int | None]] = [
            [None if e < device_first else e - device_first for e in range(num_experts)]
            for _ in range(num_layers)]
        self.owner: list[list[int | None]] = [
            [e + device_first if e + device_first < num_experts else None for e in range(r)] for r in rows]
        self.written = [[set() for _ in range(num_experts)] for _ in range(num_layers)]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        row = self.home[layer][expert]
        if row is None:
            raise LookupError(f"expert {expert} of layer {layer} lives on the device, not the host")
        return self.buffers[layer][row]

    def row_for_writeback(self, layer: int, device_experts_mru_first) -> int:
        """A host row to copy an evicted expert into: a free row, else the row of a device-resident
        expert (its copy is redundant), the most recently used first: the least likely to be
        evicted soon. That expert then lives on the device only."""
        owners = self.owner[layer]
        for row, owner in enumerate(owners):
            if owner is None:
                return row
        for expert in device_experts_mru_first:
            row = self.home[layer][expert]
            if row is not None:
                self.home[layer][expert] = None
                owners[row] = None
                return row
        raise RuntimeError(f"no host row left in layer {layer}: every expert must keep one copy")

    def place(self, layer: int, expert: int, row: int) -> None:
        """Record that ``row`` now holds a valid copy of ``expert``."""
        self.home[layer][expert] = row
        self.owner[layer][row] = expert

    def write(self, layer: int, expert: int, name: str, weight: torch.Tensor, views=None) -> None:
        """Store one original expert matrix (w1, w2 or w3) in place (in ``views`` if given:
        a device slot, for an expert that starts on the device in swap mode)."""
        self.format.write(self.views(layer, expert) if views is None else views, name, weight)
        self.written[layer][expert].add(name)

    def missing(self) -> list[tuple[int, int, str]]:
        """(layer, expert, name) of every expert matrix not written yet."""
        return [(l, e, n) for l in range(self.num_layers) for e in range(self.num_experts)
                for n in ("w1", "w2", "w3") if n not in self.written[l][e]]

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.format.layout.views(self.buffer(layer, expert))

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)
