"""A flame graph (SVG, opens in any browser) from a speedscope file of sampled stacks, as py-spy writes them for `mpnn
launch --profile`: one box per frame, as wide as the time spent in it and in what it called (callees stacked on
their callers, the root at the bottom), every thread of the process under one root. Hover a box for its name, file,
samples and share. Frames of JIT code without symbols (py-spy's bare addresses, e.g. Numba kernels) fold into one
"[native code without symbols]" box under their caller."""

from __future__ import annotations

import json
import zlib
from html import escape
from pathlib import Path

WIDTH = 1200
ROW = 16
PAD = 10
TITLE_H = 30
CHAR_W = 7.0  # at 12px monospace
MIN_W = 0.3  # boxes narrower than this (px) are left out
UNNAMED = "[native code without symbols]"


def _label(frame: dict) -> str:
    name = str(frame.get("name", "?"))
    file = frame.get("file")
    if name.startswith("0x") and file in (None, "?", ""):
        return UNNAMED
    if not file or file == "?":
        return name
    line = frame.get("line")
    base = str(file).rsplit("/", 1)[-1]
    return f"{name} ({base}:{line})" if line else f"{name} ({base})"


def _tree(data: dict) -> dict:
    """{label: [weight, children]} from every sampled profile, each thread one child of the root."""
    frames = [_label(f) for f in data["shared"]["frames"]]
    root: dict = {}
    for profile in data["profiles"]:
        samples, weights = profile.get("samples", []), profile.get("weights", [])
        if not samples:
            continue
        thread = root.setdefault(str(profile.get("name", "thread")), [0.0, {}])
        for stack, weight in zip(samples, weights):
            thread[0] += weight
            node = thread
            previous = None
            for index in stack:
                label = frames[index]
                if label == UNNAMED and previous == UNNAMED:
                    continue
                child = node[1].setdefault(label, [0.0, {}])
                child[0] += weight
                node, previous = child, label
    return root


def _colour(label: str) -> str:
    h = zlib.crc32(label.encode())
    if label == UNNAMED or ".so" in label or "(" not in label:  # native frames: cool; Python frames: warm
        return f"rgb({50 + h % 60},{140 + (h >> 8) % 70},{190 + (h >> 16) % 60})"
    return f"rgb({220 + h % 35},{90 + (h >> 8) % 110},{40 + (h >> 16) % 50})"


def render_svg(data: dict, title: str = "") -> str:
    """The flame graph of a speedscope document as SVG text."""
    root = _tree(data)
    total = sum(weight for weight, _ in root.values())
    boxes: list[tuple[int, float, float, str, float]] = []  # depth, x, width, label, weight

    def place(children: dict, depth: int, x: float) -> int:
        deepest = depth
        for label, (weight, grand) in sorted(children.items()):
            w = (WIDTH - 2 * PAD) * weight / total if total else 0.0
            if w >= MIN_W:
                boxes.append((depth, x, w, label, weight))
                deepest = max(deepest, place(grand, depth + 1, x))
            x += w
        return deepest

    depth = place(root, 1, PAD) if total else 0
    height = TITLE_H + (depth + 1) * ROW + 2 * PAD
    unit = (data.get("profiles") or [{}])[0].get("unit", "samples")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="12">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f8"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="15">'
        f"{escape(title or 'flame graph')} ({total:.3g} {escape(str(unit))} sampled)</text>",
    ]
    baseline = height - PAD - ROW
    all_label = f"all ({total:.3g} {unit})"
    out.append(
        f'<g><title>{escape(all_label)}</title><rect x="{PAD}" y="{baseline}" width="{WIDTH - 2 * PAD}" '
        f'height="{ROW - 1}" fill="rgb(200,200,200)"/><text x="{PAD + 3}" y="{baseline + ROW - 4}">all</text></g>'
    )
    for level, x, w, label, weight in boxes:
        y = baseline - level * ROW
        share = 100 * weight / total
        tip = escape(f"{label}: {weight:.4g} {unit}, {share:.1f}%")
        text = ""
        fits = int((w - 6) / CHAR_W)
        if fits >= 3:
            shown = label if len(label) <= fits else label[: fits - 2] + ".."
            text = f'<text x="{x + 3:.1f}" y="{y + ROW - 4}">{escape(shown)}</text>'
        out.append(
            f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW - 1}" '
            f'fill="{_colour(label)}" rx="1"/>{text}</g>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_flamegraph(speedscope, svg_path, title: str = "") -> Path:
    """Read a speedscope JSON file and write its flame graph to `svg_path` (ValueError when it is not one)."""
    try:
        data = json.loads(Path(speedscope).read_text())
        text = render_svg(data, title)
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{speedscope}: not a speedscope file of sampled profiles ({error!r})") from None
    path = Path(svg_path)
    path.write_text(text)
    return path
