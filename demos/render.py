"""What the demo draws, as plain HTML/SVG strings: pure functions of what the engine reported, easy to test.

- `tokens_html`: the answer with each step's accepted drafted tokens on one colour and its bonus token on another;
- `tree_svg`: the last step's draft tree, depth left to right, the accepted path marked;
- `code_map_html`: an image's code grid, each code coloured by whether an accepted draft gave it, labelled by step.
"""

from __future__ import annotations

import html

DRAFT, BONUS = "draft", "bonus"
STYLE = {DRAFT: "background:#c8f0c8;border-bottom:2px solid #2a9d2a", BONUS: "background:#ffe3b3"}


def tokens_html(pieces: list[tuple[str, str]]) -> str:
    """[(text, DRAFT | BONUS)] in order -> HTML; whitespace and newlines kept."""
    spans = []
    for text, kind in pieces:
        if not text:
            continue
        safe = html.escape(text).replace("\n", "<br>")
        spans.append(f'<span class="mm-{kind}" style="{STYLE[kind]}">{safe}</span>')
    legend = (f'<div style="font-size:12px;margin-top:6px"><span style="{STYLE[DRAFT]}">accepted draft</span> '
              f'<span style="{STYLE[BONUS]}">bonus token (one per target forward)</span></div>')
    return f'<div class="mm-answer" style="white-space:pre-wrap;line-height:1.7">{"".join(spans)}</div>{legend}'


def tree_svg(parents: list[int], labels: list[str], accepted: set[int], width: int = 640) -> str:
    """A draft tree: node i has parent parents[i] (-1 for the root) and a short label; nodes in `accepted` (the
    accepted path, root included) are drawn green, the others gray."""
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    rows: dict[int, int] = {}
    slot = []
    for d in depth:
        slot.append(rows.get(d, 0))
        rows[d] = slot[-1] + 1
    dx, dy = max(90, width // (max(depth) + 2)), 30
    height = dy * (max(rows.values()) + 1)
    pos = [(20 + dx * d, 20 + dy * s) for d, s in zip(depth, slot)]
    parts = []
    for i, p in enumerate(parents):
        if p >= 0:
            colour = "#2a9d2a" if i in accepted and p in accepted else "#bbbbbb"
            (x0, y0), (x1, y1) = pos[p], pos[i]
            parts.append(f'<line x1="{x0 + 60}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{colour}" stroke-width="2"/>')
    for i, (x, y) in enumerate(pos):
        fill = "#c8f0c8" if i in accepted else "#f2f2f2"
        text = html.escape(labels[i][:10])
        parts.append(f'<rect x="{x}" y="{y - 11}" width="60" height="22" rx="5" fill="{fill}" stroke="#888"/>'
                     f'<text x="{x + 4}" y="{y + 4}" font-size="11" font-family="monospace">{text}</text>')
    return (f'<svg class="mm-tree" xmlns="http://www.w3.org/2000/svg" width="{20 + dx * (max(depth) + 1)}" '
            f'height="{height + 10}">{"".join(parts)}</svg>')


def code_map_html(grid: int, steps: list[int], drafted: list[bool], cell: int = 22) -> str:
    """An image's codes in raster order: steps[i] = the verify step that committed code i, drafted[i] = it came from an
    accepted draft (green) rather than a target's own draw (orange). Codes not generated yet are blank."""
    cells = []
    for i in range(grid * grid):
        if i < len(steps):
            colour = "#7fd17f" if drafted[i] else "#ffc680"
            label = str(steps[i])
        else:
            colour, label = "#eeeeee", ""
        cells.append(f'<div class="mm-code {"mm-drafted" if i < len(steps) and drafted[i] else ""}" '
                     f'style="background:{colour};width:{cell}px;height:{cell}px;font-size:9px;text-align:center;'
                     f'line-height:{cell}px">{label}</div>')
    grid_css = f"display:grid;grid-template-columns:repeat({grid},{cell}px);gap:1px"
    legend = ('<div style="font-size:12px;margin-top:6px"><span style="background:#7fd17f">accepted draft</span> '
              '<span style="background:#ffc680">drawn by the target</span>; the number is the verify step</div>')
    return f'<div class="mm-codemap" style="{grid_css}">{"".join(cells)}</div>{legend}'
