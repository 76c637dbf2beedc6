"""Draw the notebooks' conceptual diagrams as SVG files under notebooks/figures/ (committed).

    python -m tools.figures            write every diagram
    python -m tools.figures --check    exit 1 if a committed diagram differs from this code

Each diagram is a few boxes, arrows and words, laid out by hand below; colours are the
Okabe-Ito palette (safe for colour-blind readers), the same as the notebooks' figures. The numbers
in them are Mixtral-8x7B's shapes and the paper's (Eliseev & Mazur, arXiv 2312.17238).
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "notebooks" / "figures"
BLUE, ORANGE, GREEN, SKY, VERMILLION, PURPLE, YELLOW, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#56B4E9", "#D55E00", "#CC79A7", "#F0E442", "#BBBBBB")
LIGHT = "#F2F2F2"


class Svg:
    def __init__(self, width: int, height: int, title: str):
        self.w, self.h = width, height
        self.parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='100%' "
                      f"style='max-width:{width}px' font-family='DejaVu Sans, Arial, sans-serif' font-size='13'>",
                      f"<title>{html.escape(title)}</title>",
                      "<defs><marker id='a' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
                      "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#333'/></marker></defs>",
                      f"<rect width='{width}' height='{height}' fill='white'/>"]

    def box(self, x, y, w, h, text="", fill=LIGHT, stroke="#333", colour="#000", size=13, bold=False, rx=6):
        self.parts.append(f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='{rx}' fill='{fill}' stroke='{stroke}'/>")
        lines = text.split("\n") if text else []
        for i, line in enumerate(lines):
            ty = y + h / 2 + (i - (len(lines) - 1) / 2) * (size + 3) + size * 0.35
            self.text(x + w / 2, ty, line, size=size, colour=colour, bold=bold)

    def text(self, x, y, s, size=13, colour="#000", anchor="middle", bold=False, italic=False):
        style = (" font-weight='bold'" if bold else "") + (" font-style='italic'" if italic else "")
        self.parts.append(f"<text x='{x}' y='{y}' font-size='{size}' fill='{colour}' text-anchor='{anchor}'{style}>"
                          f"{html.escape(s)}</text>")

    def arrow(self, x1, y1, x2, y2, colour="#333", width=1.6, dash=False, label=None, both=False):
        d = " stroke-dasharray='5,4'" if dash else ""
        start = " marker-start='url(#a)'" if both else ""
        self.parts.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='{colour}' stroke-width='{width}'{d} "
                          f"marker-end='url(#a)'{start}/>")
        if label:
            self.text((x1 + x2) / 2, (y1 + y2) / 2 - 6, label, size=11, colour="#333")

    def render(self) -> str:
        return "\n".join(self.parts + ["</svg>"]) + "\n"


def moe_layer() -> str:
    s = Svg(760, 330, "A Mixtral MoE layer: the router picks 2 of 8 experts per token")
    s.text(380, 24, "One MoE layer, one token (Mixtral: 32 such layers, 8 experts each, top-2)", size=15, bold=True)
    s.box(20, 135, 110, 50, "hidden state h\n[4096]", fill=SKY)
    s.box(150, 135, 132, 50, "router\nsoftmax(W_gate·h)", fill=YELLOW, size=12)
    s.arrow(130, 160, 150, 160)
    probs = [0.05, 0.41, 0.06, 0.04, 0.08, 0.27, 0.05, 0.04]
    for e, p in enumerate(probs):
        y = 50 + e * 32
        chosen = e in (1, 5)
        s.box(330, y, 150, 26, f"expert {e}" + ("  (w = %.2f)" % (p / 0.68) if chosen else ""),
              fill=ORANGE if chosen else "white", stroke="#333" if chosen else GREY,
              colour="#000" if chosen else "#888", size=12)
        s.parts.append(f"<rect x='{292}' y='{y + 4}' width='{p * 80:.1f}' height='18' fill='{BLUE if chosen else GREY}'/>")
        if chosen:
            s.arrow(480, y + 13, 560, 160)
    s.text(300, 318, "bars: router probabilities; the top-2 are renormalised to weights w", size=11, colour="#333",
           anchor="start")
    s.box(560, 135, 80, 50, "w1·E1(h)\n+ w5·E5(h)", fill=GREEN, colour="white")
    s.box(665, 135, 80, 50, "output\n[4096]", fill=SKY)
    s.arrow(640, 160, 665, 160)
    s.text(405, 310 - 260, "", size=1)
    return s.render()


def reuse() -> str:
    s = Svg(760, 300, "Reuse across tokens: consecutive tokens often pick an expert again")
    s.text(380, 24, "Reuse across tokens: the experts of token t at one layer, over time", size=15, bold=True)
    tokens = ["def", " fib", "(", "n", "):", "\u21b5", "  if", " n"]
    picks = [(1, 5), (1, 3), (5, 1), (5, 6), (2, 5), (2, 7), (5, 2), (5, 0)]
    for t, (tok, pair) in enumerate(zip(tokens, picks)):
        x = 60 + t * 85
        s.text(x + 35, 62, f"t={t}", size=11, colour="#555")
        s.box(x, 70, 70, 26, repr(tok)[1:-1], fill="white", size=12)
        for r, e in enumerate(pair):
            prev = picks[t - 1] if t else ()
            again = e in prev
            s.box(x, 110 + r * 34, 70, 28, f"e{e}", fill=BLUE if again else "white", colour="white" if again else "#000",
                  stroke=BLUE if again else "#333")
    s.box(60, 200, 18, 18, "", fill=BLUE, stroke=BLUE, rx=2)
    s.text(86, 214, "already used by the previous token: an LRU cache of the recent experts would hold it", anchor="start",
           size=12)
    s.text(60, 250, "Random top-2 of 8 would share an expert with the previous token 46% of the time",
           anchor="start", size=12)
    s.text(60, 270, "(1 - C(6,2)/C(8,2)); notebook 02 measures how much more often real routing does.",
           anchor="start", size=12)
    return s.render()


def cache_slots() -> str:
    s = Svg(780, 360, "The expert cache: host buffers, device slots, one copy per miss")
    s.text(390, 24, "Per layer: every expert packed in one host buffer; k device slots in LRU order", size=15, bold=True)
    s.box(20, 45, 330, 290, "", fill="#FFF8E6", stroke=ORANGE)
    s.text(185, 66, "host RAM (pinned): ExpertStore.buffers[l]", size=12, bold=True)
    for e in range(8):
        y = 80 + e * 30
        s.box(40, y, 290, 24, f"expert {e}: one uint8 row (w1, w2, w3 packed)", fill="white", size=11)
    s.box(430, 45, 330, 290, "", fill="#E8F3FA", stroke=BLUE)
    s.text(595, 66, "GPU: ExpertCache.layers[l].slots", size=12, bold=True)
    lru = [(3, "least recently used"), (1, ""), (6, ""), (2, "most recently used")]
    for i, (e, note) in enumerate(lru):
        y = 90 + i * 42
        s.box(450, y, 120, 32, f"slot {i}: e{e}", fill=BLUE, colour="white", size=12)
        if note:
            s.text(585, y + 21, note, anchor="start", size=11, colour="#333")
    s.arrow(330, 140, 450, 117, colour=VERMILLION, width=2.2, label="miss: one copy")
    s.text(520, 290, "hit: the expert is in a slot, compute at once", size=11)
    s.text(520, 308, "miss: evict the LRU slot, copy the expert in", size=11)
    s.text(520, 326, "swap mode: the evicted expert is copied back first", size=11)
    s.text(390, 352, "copies run on their own CUDA stream (cache.copy_stream); events order them with compute", size=11,
           colour="#333")
    return s.render()


def prefetch_timeline() -> str:
    s = Svg(780, 330, "Speculative loading moves copies off the critical path")
    s.text(390, 24, "Two layers of one token: without and with speculative prefetch", size=15, bold=True)

    def lanes(y0, label, prefetch):
        s.text(20, y0 - 8, label, anchor="start", bold=True, size=13)
        s.text(110, y0 + 17, "compute", anchor="end", size=12)
        s.text(110, y0 + 47, "copy", anchor="end", size=12)
        x = 120
        # layer l: sync, hit compute, miss copy then compute
        s.box(x, y0, 14, 26, "", fill="#000", rx=1)
        s.box(x + 14, y0, 70, 26, "hit e3", fill=BLUE, colour="white", size=11, rx=1)
        s.box(x + 14, y0 + 32, 110, 26, "miss e5", fill=VERMILLION, colour="white", size=11, rx=1)
        s.box(x + 84, y0, 40, 26, "wait", fill=YELLOW, size=11, rx=1)
        s.box(x + 124, y0, 70, 26, "e5", fill=BLUE, colour="white", size=11, rx=1)
        s.box(x + 194, y0, 60, 26, "attn", fill=GREY, size=11, rx=1)
        nx = x + 254
        if prefetch:
            s.box(x + 124, y0 + 32, 110, 26, "prefetch e7", fill=GREEN, colour="white", size=11, rx=1)
            s.box(nx, y0, 14, 26, "", fill="#000", rx=1)
            s.box(nx + 14, y0, 70, 26, "hit e7", fill=BLUE, colour="white", size=11, rx=1)
            s.box(nx + 84, y0, 70, 26, "hit e1", fill=BLUE, colour="white", size=11, rx=1)
            end = nx + 154
        else:
            s.box(nx, y0, 14, 26, "", fill="#000", rx=1)
            s.box(nx + 14, y0 + 32, 110, 26, "miss e7", fill=VERMILLION, colour="white", size=11, rx=1)
            s.box(nx + 14, y0, 70, 26, "hit e1", fill=BLUE, colour="white", size=11, rx=1)
            s.box(nx + 84, y0, 40, 26, "wait", fill=YELLOW, size=11, rx=1)
            s.box(nx + 124, y0, 70, 26, "e7", fill=BLUE, colour="white", size=11, rx=1)
            end = nx + 194
        s.text(x + 100, y0 + 76, "layer l", size=11, colour="#555")
        s.text(nx + 80, y0 + 76, "layer l+1", size=11, colour="#555")
        s.parts.append(f"<line x1='{nx}' x2='{nx}' y1='{y0 - 4}' y2='{y0 + 62}' stroke='#999' stroke-dasharray='3,3'/>")
        s.text(end + 8, y0 + 18, "token done" if prefetch else "token done (later)", anchor="start", size=11)
        return end

    a = lanes(60, "without prefetch", False)
    b = lanes(185, "with prefetch: layer l+1's router guesses e7 from layer l's hidden state", True)
    s.box(20, 290, 14, 14, "", fill="#000", rx=1)
    s.text(40, 302, "host sync: the host learns the router's choice", anchor="start", size=11)
    s.text(20, 322, f"The guessed copy runs while layer l computes; a wrong guess costs a copy and may evict "
           f"a useful expert.", anchor="start", size=12)
    return s.render()


def quant_layout() -> str:
    s = Svg(780, 330, "One quantized expert: codes, 8-bit scales and zeros, meta-scales, in one buffer")
    s.text(390, 24, "paper-2bit expert: one contiguous buffer, one copy", size=15, bold=True)
    s.text(20, 58, "a group of 16 weights of one row:", anchor="start", size=12)
    vals = [0.031, -0.012, 0.004, 0.022, -0.027, 0.009, 0.015, -0.003]
    for i, v in enumerate(vals):
        s.box(20 + i * 62, 66, 58, 24, f"{v:+.3f}", fill="white", size=11, rx=2)
    s.text(520, 83, "... (16 per group)", anchor="start", size=11)
    s.arrow(260, 92, 260, 118, label="")
    s.text(272, 110, "W ≈ (Q − Z)·S", anchor="start", size=12, italic=True)
    for i, q in enumerate([3, 1, 2, 3, 0, 2, 2, 1]):
        s.box(20 + i * 62, 122, 58, 24, f"Q={q}", fill=SKY, size=11, rx=2)
    s.box(520, 122, 110, 24, "S, Z: 8-bit", fill=ORANGE, size=11, rx=2)
    s.box(640, 122, 120, 24, "per 128 S: fp16", fill=YELLOW, size=11, rx=2)
    s.text(20, 180, "the expert's buffer, schematic (w1, w2, w3; offsets aligned to 64 bytes; PackedLayout lists the real order):", anchor="start", size=12)
    parts = [("w1 codes (2-bit, planar)", 170, SKY), ("w1 S,Z", 40, ORANGE), ("·", 12, YELLOW),
             ("w2 codes", 170, SKY), ("w2 S,Z", 40, ORANGE), ("·", 12, YELLOW),
             ("w3 codes", 170, SKY), ("w3 S,Z", 40, ORANGE), ("·", 12, YELLOW)]
    x = 20
    for label, w, c in parts:
        s.box(x, 190, w, 34, label, fill=c, size=11, rx=1)
        x += w
    s.text(20, 254, "bits per weight, 2-bit scheme: 2 (code) + 16/16 (8-bit S and Z per group of 16)", anchor="start",
           size=12)
    s.text(20, 274, "+ 4·16/(16·128) (fp16 step and zero per scale group, for S and for Z) = 3.03", anchor="start",
           size=12)
    s.text(20, 300, "planar: byte j of a row holds inputs j, j+n/4, j+2n/4, j+3n/4 (2 bits each): shifts only",
           anchor="start", size=12)
    return s.render()


def t4_plan() -> str:
    s = Svg(780, 300, "Mixtral-8x7B on a free Colab T4: what goes where")
    s.text(390, 24, "Mixtral-8x7B at 4-bit attention / 2-bit experts on a free Colab (the planner's swap plan)",
           size=14, bold=True)
    s.text(20, 62, "T4 GPU, 15 GiB", anchor="start", bold=True)
    x = 150
    for label, w, c in [("trunk: attention, embeddings", 150, SKY), ("expert slots: 5 of 8 per layer", 330, BLUE),
                        ("KV cache, activations", 110, GREY), ("margin", 60, LIGHT)]:
        s.box(x, 44, w, 30, label, fill=c, colour="white" if c == BLUE else "#000", size=11, rx=1)
        x += w
    s.text(20, 132, "host RAM, 12.7 GB", anchor="start", bold=True)
    x = 150
    for label, w, c in [("experts not on the GPU: 3 (+1 spare) of 8 per layer", 380, ORANGE),
                        ("Python, torch, tokenizer", 160, GREY), ("free", 110, LIGHT)]:
        s.box(x, 114, w, 30, label, fill=c, size=11, rx=1)
        x += w
    s.arrow(400, 112, 400, 78, both=True, label="")
    s.text(410, 100, "PCIe ~12 GB/s: one copy per miss (and one back in swap mode)", anchor="start", size=11)
    s.text(20, 190, "Swap mode: each expert lives on the GPU or in host RAM, never both; 16-bit (87 GiB) is refused.",
           anchor="start", size=12)
    s.text(20, 212, "Disk: the weights arrive once (about 18 GiB pre-quantized), then load in minutes.",
           anchor="start", size=12)
    s.text(20, 234, "Sizes are drawn to suggest proportions; moe_colab.plan(...) prints the exact table.",
           anchor="start", size=11, colour="#555")
    return s.render()


def course_map() -> str:
    s = Svg(780, 250, "The notebooks and how they build on each other")
    s.text(390, 24, "The course: routing, locality, cache, prefetch, quantization, the real model, the engine",
           size=14, bold=True)
    nodes = {"01": (20, 60, "01 router"), "02": (150, 60, "02 locality"), "03": (280, 60, "03 LRU cache"),
             "04": (410, 60, "04 prefetch"), "05": (540, 60, "05 quantization"), "06": (410, 160, "06 Mixtral on a T4"),
             "07": (150, 160, "07 inside the engine")}
    for key, (x, y, label) in nodes.items():
        s.box(x, y, 118, 40, label, fill=BLUE if key in ("06",) else SKY if key != "07" else GREEN,
              colour="white" if key in ("06", "07") else "#000", size=12)
    for a, b in [("01", "02"), ("02", "03"), ("03", "04"), ("04", "05")]:
        (x1, y1, _), (x2, y2, _) = nodes[a], nodes[b]
        s.arrow(x1 + 118, y1 + 20, x2, y2 + 20)
    s.arrow(599, 100, 528, 160)
    s.arrow(469, 100, 469, 160)
    s.arrow(339, 100, 268, 160)
    s.text(20, 232, "Each runs on a CPU in under a minute with the shipped tiny model; USE_REAL_MIXTRAL = True "
           "switches to Mixtral-8x7B on a GPU.", anchor="start", size=11)
    return s.render()


DIAGRAMS = {"moe_layer.svg": moe_layer, "reuse.svg": reuse, "cache_slots.svg": cache_slots,
            "prefetch_timeline.svg": prefetch_timeline, "quant_layout.svg": quant_layout, "t4_plan.svg": t4_plan,
            "course_map.svg": course_map}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    FIGURES.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, draw in DIAGRAMS.items():
        path, text = FIGURES / name, draw()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        elif not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python -m tools.figures): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
