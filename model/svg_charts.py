"""Inline SVG charts for agreement reports, drawn in Python: a report is one file that opens offline, with no
script and nothing fetched. Every text that reaches the markup goes through ``esc`` (dimension names and
values come from users' label configs).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FONT = 'font-family="system-ui, sans-serif" font-size="12"'
GRID = "#e5e7eb"
INK = "#111827"
MUTED = "#6b7280"
PALETTE = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0891b2", "#db2777", "#65a30d")


Scale = Callable[[float], float]


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def short(text: str, width: int = 26) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _n(x: float) -> str:
    return f"{x:.1f}"


@dataclass(frozen=True)
class Bar:
    series: str
    value: float | None
    ci: tuple[float, float] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class BarRow:
    label: str
    bars: list[Bar]
    reference: float | None = None  # drawn as a dashed tick: the humans' figure the model is held to


@dataclass
class Series:
    name: str
    points: list[tuple[float, float | None, tuple[float, float] | None]]  # (x, y, ci)
    color: str = PALETTE[0]
    dashed: bool = False
    hollow_at: set[float] = field(default_factory=set)  # x positions drawn as open circles (e.g. refused)


def _ticks(lo: float, hi: float) -> list[float]:
    step = 0.25 if hi - lo <= 1.6 else 0.5
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 2) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _legend(items: Sequence[tuple[str, str, bool]], x: float, y: float, width: float, solid: float = 8
            ) -> tuple[str, float]:
    """Legend entries (name, colour, dashed) wrapped into rows within ``width``; returns markup and height."""
    parts, cx, cy = [], x, y
    for name, color, dashed in items:
        item_w = 34 + 7 * len(name)
        if cx > x and cx + item_w > x + width:
            cx, cy = x, cy + 18
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        parts.append(f'<line x1="{_n(cx)}" y1="{_n(cy)}" x2="{_n(cx + 18)}" y2="{_n(cy)}" stroke="{color}" '
                     f'stroke-width="{2 if dashed else solid}"{dash}/>')
        parts.append(f'<text x="{_n(cx + 22)}" y="{_n(cy + 4)}" fill="{INK}">{esc(name)}</text>')
        cx += item_w
    return "".join(parts), cy - y + 18


def _value_range(values: Sequence[float | None], floor: float = -0.2) -> tuple[float, float]:
    present = [v for v in values if v is not None]
    lo = min([floor, *present])
    return math.floor(lo * 4) / 4, 1.0


def alpha_bars(rows: Sequence[BarRow], series: Sequence[str], reference_name: str, chart: str = "alpha-bars",
               colors: dict[str, str] | None = None) -> str:
    """One row per dimension, a horizontal bar per series with its 95% interval, the reference as a tick."""
    colors = colors or dict(zip(series, PALETTE, strict=False))
    left, width, bar_h = 190, 440, 12
    legend, legend_h = _legend([*((s, colors[s], False) for s in series), (reference_name, INK, True)], 10, 14,
                               left + width)
    top = 26 + legend_h
    row_h = len(series) * (bar_h + 2) + 14
    values = [v for r in rows for b in r.bars for v in (b.value, *(b.ci or ()))] + [r.reference for r in rows]
    lo, hi = _value_range(values)
    height = top + row_h * len(rows) + 30

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * width

    out = [f'<svg class="chart {esc(chart)}" data-chart="{esc(chart)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{left + width + 60}" height="{height}" {FONT} role="img">', legend]
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{_n(x(t))}" y1="{top - 6}" x2="{_n(x(t))}" y2="{height - 24}" stroke="{GRID}"/>'
                   f'<text x="{_n(x(t))}" y="{height - 8}" text-anchor="middle" fill="{MUTED}">{t:g}</text>')
    out.append(f'<line x1="{_n(x(0))}" y1="{top - 6}" x2="{_n(x(0))}" y2="{height - 24}" stroke="{MUTED}"/>')
    for r, row in enumerate(rows):
        y0 = top + r * row_h
        out.append(f'<text x="{left - 8}" y="{_n(y0 + row_h / 2)}" text-anchor="end" fill="{INK}">'
                   f'<title>{esc(row.label)}</title>{esc(short(row.label))}</text>')
        for b, bar in enumerate(row.bars):
            out.append(_bar(bar, y0 + b * (bar_h + 2), bar_h, x, colors.get(bar.series, MUTED), row.label))
        if row.reference is not None:
            out.append(f'<line class="reference" x1="{_n(x(row.reference))}" y1="{_n(y0 - 3)}" '
                       f'x2="{_n(x(row.reference))}" y2="{_n(y0 + row_h - 11)}" stroke="{INK}" stroke-width="2" '
                       f'stroke-dasharray="4 3"><title>{esc(reference_name)}: {row.reference:.3f}</title></line>')
    out.append("</svg>")
    return "".join(out)


def _bar(bar: Bar, y: float, h: float, scale: Scale, color: str, dim: str) -> str:
    zero = scale(0.0)
    if bar.value is None and bar.reason == "":
        return ""  # nothing to draw or say (e.g. said once for the row already)
    if bar.value is None:
        return (f'<text class="na" x="{_n(zero + 4)}" y="{_n(y + h - 2)}" fill="{MUTED}" font-size="11">'
                f'<title>{esc(bar.reason or "undefined")}</title>n/a: {esc(short(bar.reason or "undefined", 60))}'
                "</text>")
    start, end = sorted((zero, scale(bar.value)))
    tip = f"{bar.series}: {bar.value:.3f}" + (f" (95% CI {bar.ci[0]:.3f} to {bar.ci[1]:.3f})" if bar.ci else "")
    out = [f'<rect class="bar" data-series="{esc(bar.series)}" data-dim="{esc(dim)}" x="{_n(start)}" y="{_n(y)}" '
           f'width="{_n(max(end - start, 1.5))}" height="{h}" fill="{color}"><title>{esc(tip)}</title></rect>']
    if bar.ci:
        a, b, mid = scale(bar.ci[0]), scale(bar.ci[1]), y + h / 2
        out.append(f'<path class="ci" d="M{_n(a)} {_n(mid)}H{_n(b)}M{_n(a)} {_n(y + 2)}V{_n(y + h - 2)}'
                   f'M{_n(b)} {_n(y + 2)}V{_n(y + h - 2)}" stroke="{INK}" stroke-width="1.2" fill="none"/>')
    label_x = max(end, scale(bar.ci[1]) if bar.ci else end) + 4
    out.append(f'<text x="{_n(label_x)}" y="{_n(y + h - 2)}" fill="{INK}" font-size="10">{bar.value:.2f}</text>')
    return "".join(out)


def confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]], rows_name: str, cols_name: str,
              chart: str = "confusion") -> str:
    """Counts, shaded by share of their row: where the model's answers go for each consensus value."""
    n = len(labels)
    cell = max(14, min(40, 360 // max(n, 1)))
    longest = max((len(short(label, 14)) for label in labels), default=1)
    left, top = 130, 34 + int(5 * longest)
    size = cell * n
    out = [f'<svg class="chart {esc(chart)}" data-chart="{esc(chart)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{left + size + 20}" height="{top + size + 30}" {FONT} role="img">',
           f'<text x="{left + size / 2}" y="14" text-anchor="middle" fill="{MUTED}">{esc(cols_name)} →</text>',
           f'<text x="12" y="{top + size / 2}" fill="{MUTED}" transform="rotate(-90 12 {top + size / 2})" '
           f'text-anchor="middle">{esc(rows_name)} →</text>']
    for i, label in enumerate(labels):
        cx, cy = left + i * cell + cell / 2, top + i * cell + cell / 2
        out.append(f'<text x="{_n(cx)}" y="{top - 6}" transform="rotate(-45 {_n(cx)} {top - 6})" fill="{INK}">'
                   f'<title>{esc(label)}</title>{esc(short(label, 14))}</text>')
        out.append(f'<text x="{left - 6}" y="{_n(cy + 4)}" text-anchor="end" fill="{INK}">'
                   f'<title>{esc(label)}</title>{esc(short(label, 16))}</text>')
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, count in enumerate(row):
            share = count / total
            stroke = f' stroke="{INK}"' if i == j else f' stroke="{GRID}"'
            out.append(f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" width="{cell}" '
                       f'height="{cell}" fill="{PALETTE[0]}" fill-opacity="{0.06 + 0.94 * share:.3f}"{stroke}>'
                       f'<title>{esc(labels[i])} → {esc(labels[j])}: {count}</title></rect>')
            if cell >= 20:
                ink = "#ffffff" if share > 0.55 else INK
                out.append(f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" '
                           f'text-anchor="middle" fill="{ink}" font-size="11">{count}</text>')
    out.append("</svg>")
    return "".join(out)


def line_chart(series: Sequence[Series], x_ticks: Sequence[tuple[float, str]], x_name: str, y_name: str,
               log_x: bool = False, references: Sequence[tuple[str, float, str]] = (),
               chart: str = "line") -> str:
    """Lines with points (and 95% intervals); ``references`` are horizontal dashed lines (name, y, colour)."""
    left, width, height = 56, 460, 220
    legend, legend_h = _legend([(s.name, s.color, s.dashed) for s in series] + [(n, c, True) for n, _, c in references],
                               8, 12, left + width, solid=3)
    top = 16 + legend_h
    xs = [x for x, _ in x_ticks] or [0.0, 1.0]
    tx = [math.log2(x) if log_x else x for x in xs]
    x_lo, x_hi = min(tx), max(tx)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    ys = [v for s in series for _, y, ci in s.points for v in (y, *(ci or ()))] + [r[1] for r in references]
    y_lo, y_hi = _value_range(ys, floor=-0.1)

    def px(x: float) -> float:
        v = math.log2(x) if log_x else x
        return left + 10 + (v - x_lo) / (x_hi - x_lo) * (width - 20)

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * height

    out = [f'<svg class="chart {esc(chart)}" data-chart="{esc(chart)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{left + width + 20}" height="{top + height + 44}" {FONT} role="img">', legend]
    for t in _ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" y1="{_n(py(t))}" x2="{left + width}" y2="{_n(py(t))}" stroke="{GRID}"/>'
                   f'<text x="{left - 6}" y="{_n(py(t) + 4)}" text-anchor="end" fill="{MUTED}">{t:g}</text>')
    for x, label in x_ticks:
        out.append(f'<text x="{_n(px(x))}" y="{top + height + 16}" text-anchor="middle" fill="{MUTED}">'
                   f'<title>{esc(label)}</title>{esc(short(label, 12))}</text>')
    out.append(f'<text x="{left + width / 2}" y="{top + height + 36}" text-anchor="middle" fill="{INK}">'
               f'{esc(x_name)}</text><text x="14" y="{top + height / 2}" transform="rotate(-90 14 {top + height / 2})"'
               f' text-anchor="middle" fill="{INK}">{esc(y_name)}</text>')
    for name, y, color in references:
        out.append(f'<line class="reference" x1="{left}" y1="{_n(py(y))}" x2="{left + width}" y2="{_n(py(y))}" '
                   f'stroke="{color}" stroke-width="2" stroke-dasharray="6 4"><title>{esc(name)}: {y:.3f}</title>'
                   "</line>")
    for s in series:
        out.append(_series(s, px, py))
    out.append("</svg>")
    return "".join(out)


def _series(s: Series, px: Scale, py: Scale) -> str:
    dash = ' stroke-dasharray="5 4"' if s.dashed else ""
    out, path = [], []
    for x, y, ci in s.points:
        if y is None:
            path.append(None)
            continue
        path.append((px(x), py(y)))
        if ci:
            out.append(f'<line class="ci" x1="{_n(px(x))}" y1="{_n(py(ci[0]))}" x2="{_n(px(x))}" '
                       f'y2="{_n(py(ci[1]))}" stroke="{s.color}" stroke-width="1.2"/>')
        fill = "#ffffff" if x in s.hollow_at else s.color
        out.append(f'<circle class="point" data-series="{esc(s.name)}" cx="{_n(px(x))}" cy="{_n(py(y))}" r="4" '
                   f'fill="{fill}" stroke="{s.color}" stroke-width="2"><title>{esc(s.name)} @ {x:g}: {y:.3f}'
                   "</title></circle>")
    segments, current = [], []
    for p in [*path, None]:
        if p is None:
            if len(current) > 1:
                segments.append("M" + "L".join(f"{_n(a)} {_n(b)}" for a, b in current))
            current = []
        else:
            current.append(p)
    if segments:
        out.insert(0, f'<path class="line" d="{" ".join(segments)}" stroke="{s.color}" stroke-width="2" '
                      f'fill="none"{dash}/>')
    return "".join(out)
