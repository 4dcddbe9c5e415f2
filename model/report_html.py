"""Self-contained HTML pages for agreement reports: ``evaluate``, ``learning-curve`` and a live project.

One file, inline CSS and SVG, no script, nothing fetched (the backend often runs offline); a Content Security
Policy forbids scripts anyway, so a missed escape cannot run code. All user text goes through ``esc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slm_annotator.model.svg_charts import (
    INK,
    MUTED,
    PALETTE,
    Bar,
    BarRow,
    Series,
    alpha_bars,
    confusion,
    esc,
    line_chart,
)

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body{font-family:system-ui,sans-serif;color:#111827;max-width:1100px;margin:24px auto;padding:0 16px;line-height:1.45}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f9fafb}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.na{color:#6b7280}.meta{color:#4b5563;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:24px}
figure{margin:8px 0}.wide{overflow-x:auto}figcaption{font-weight:600;margin-bottom:4px}
.note{color:#4b5563;font-size:13px;max-width:820px}
"""
HUMAN_GREY = "#9ca3af"
SERIES = {
    "human_alpha": "humans (α among raters)",
    "model_alpha_as_rater": "model as one more rater",
    "model_vs_consensus": "model vs consensus",
    "model_vs_each_human_mean": "model vs each human (mean)",
}
REFERENCE = "humans, pairwise mean"
ORDER_CAPTION = "rows: human consensus (majority; median for ordinal), columns: model"


def page(title: str, sections: Sequence[str], meta: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><div class=\"meta\">{meta}</div>{''.join(sections)}</body></html>\n"
    )


def cell(entry: dict[str, Any] | None, ci: bool = True) -> str:
    """A table cell: value [95% CI], or n/a with the reason as a tooltip."""
    if not entry or entry.get("value") is None:
        reason = (entry or {}).get("reason") or "not computed"
        return f'<td class="na" title="{esc(reason)}">n/a</td>'
    interval = entry.get("ci") if ci else None
    text = f"{entry['value']:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
    return f'<td class="num">{esc(text)}</td>'


def number_cell(x: float | None, digits: int = 3) -> str:
    return '<td class="na">n/a</td>' if x is None else f'<td class="num">{x:.{digits}f}</td>'


def _meta(pairs: Sequence[tuple[str, Any]]) -> str:
    return " · ".join(f"{esc(k)}: <b>{esc(v)}</b>" for k, v in pairs if v not in (None, ""))


# -- agreement sections (evaluate and the live project page) ---------------------------------------------


def _ci(entry: dict[str, Any] | None) -> tuple[float, float] | None:
    ci = (entry or {}).get("ci")
    return (ci[0], ci[1]) if ci else None


def agreement_chart(report: dict[str, Any]) -> str:
    has_model = any("model_alpha_as_rater" in d for d in report["dimensions"].values())
    keys = list(SERIES) if has_model else ["human_alpha"]
    rows = []
    for key, d in report["dimensions"].items():
        bars = [Bar(SERIES[k], (d.get(k) or {}).get("value"), _ci(d.get(k)), (d.get(k) or {}).get("reason"))
                for k in keys]
        if "model_reason" in d and len(bars) > 1:  # said once for the model, not once per measure
            bars[1:] = [Bar(bars[1].series, None, None, d["model_reason"]), *(Bar(b.series, None, None, "")
                                                                              for b in bars[2:])]
        rows.append(BarRow(d.get("title") or key, bars, (d.get("human_pairwise_mean") or {}).get("value")))
    if not rows:
        return '<p class="na">No dimensions.</p>'
    return ("<figure><figcaption>Krippendorff's α per dimension (95% bootstrap interval over items)</figcaption>"
            + alpha_bars(rows, [SERIES[k] for k in keys], REFERENCE, colors=_colors()) + "</figure>")


def _colors() -> dict[str, str]:
    """Humans grey, the model's three views in colour."""
    return dict(zip(SERIES.values(), (HUMAN_GREY, *PALETTE[:3]), strict=True))


def agreement_table(report: dict[str, Any]) -> str:
    head = ("<tr><th>dimension</th><th>level</th><th>items</th><th>raters</th><th>humans α</th>"
            "<th>humans pairwise</th><th>model as rater</th><th>model vs consensus</th>"
            "<th>model vs each human</th><th>accuracy</th><th>MAE</th></tr>")
    rows = []
    for key, d in report["dimensions"].items():
        rows.append(
            f"<tr><td>{esc(key)}</td><td>{esc(d['level'])}</td><td class=\"num\">{d['n_items']}</td>"
            f"<td class=\"num\">{d['n_raters']}</td>{cell(d['human_alpha'])}{cell(d['human_pairwise_mean'])}"
            f"{cell(d.get('model_alpha_as_rater'))}{cell(d.get('model_vs_consensus'))}"
            f"{cell(d.get('model_vs_each_human_mean'))}{cell(d.get('accuracy_vs_consensus'))}"
            f"{cell(d.get('mae_vs_consensus'))}</tr>")
    return f"<div class=\"wide\"><table>{head}{''.join(rows)}</table></div>"


def distribution_table(report: dict[str, Any]) -> str:
    """What the humans chose and what the model answered: a model that answers one value for everything
    (collapse to the majority) shows at once."""
    rows = "".join(
        f"<tr><td>{esc(key)}</td>{_histogram(d.get('human_histogram'), d['level'])}"
        f"{_histogram(d.get('predicted_histogram'), d['level'])}</tr>" for key, d in report["dimensions"].items())
    return ("<h2>Labels and answers</h2><div class=\"wide\"><table><tr><th>dimension</th><th>human labels</th>"
            f"<th>model answers</th></tr>{rows}</table></div>")


def _histogram(hist: dict[str, int] | None, level: str, limit: int = 12) -> str:
    if not hist or not any(hist.values()):
        return '<td class="na">-</td>'
    used = {k: v for k, v in hist.items() if v}
    if level == "interval":
        numbers = sorted(float(k) for k in used)
        return f"<td>{sum(used.values())} values from {numbers[0]:g} to {numbers[-1]:g}</td>"
    parts = [f"{esc(k)}&nbsp;<b>{v}</b>" for k, v in list(hist.items())[:limit]]
    more = f" · … {len(hist) - limit} more" if len(hist) > limit else ""
    return f"<td>{' · '.join(parts)}{more}</td>"


def confusion_section(report: dict[str, Any]) -> str:
    figures = []
    for key, d in report["dimensions"].items():
        cm = d.get("confusion_vs_consensus") or {}
        if cm.get("matrix") and any(any(r) for r in cm["matrix"]):
            figures.append(f"<figure><figcaption>{esc(d.get('title') or key)}</figcaption>"
                           + confusion(cm["labels"], cm["matrix"], "human consensus", "model") + "</figure>")
    if not figures:
        return ""
    return (f"<h2>Confusion matrices</h2><p class=\"note\">{esc(ORDER_CAPTION)}; shading: share of the row.</p>"
            f"<div class=\"grid\">{''.join(figures)}</div>")


def version_chart(versions: Sequence[dict[str, Any]], measure: str, caption: str) -> str:
    """α per dimension for each model version, oldest left; open circles: versions not served."""
    if not versions:
        return ""
    keys = list(dict.fromkeys(k for v in versions for k in v["dimensions"]))
    ticks = [(float(i), str(v.get("label") or v["model_version"])) for i, v in enumerate(versions)]
    hollow = {float(i) for i, v in enumerate(versions) if v.get("status") in ("refused", "retired")}
    series = [Series(k, [(float(i), _value(v["dimensions"].get(k, {}).get(measure)), None)
                         for i, v in enumerate(versions)], PALETTE[n % len(PALETTE)], hollow_at=hollow)
              for n, k in enumerate(keys)]
    return (f"<figure><figcaption>{esc(caption)}</figcaption>"
            + line_chart(series, ticks, "model version (oldest first)", "α", chart="versions") + "</figure>")


def _value(entry: Any) -> float | None:
    return entry.get("value") if isinstance(entry, dict) else entry


def agreement_sections(report: dict[str, Any]) -> list[str]:
    model = report.get("model")
    intro = (f"<p class=\"note\">Model: <b>{esc(model)}</b>. \"Model as one more rater\" is α over the humans and "
             "the model together (it falls below the humans' α if the model is an outlier); \"model vs consensus\""
             " compares it with the majority (median for ordinal, mean for interval); \"model vs each human\" is "
             "comparable with the humans' pairwise mean (the dashed tick).</p>" if model else
             "<p class=\"note\">Humans only (no model predictions). The dashed tick is the humans' mean "
             "pairwise α.</p>")
    out = ["<h2>Agreement per dimension</h2>", intro, agreement_chart(report), agreement_table(report),
           _raters(report), distribution_table(report), confusion_section(report)]
    if len(report.get("versions") or []) > 1:
        out += ["<h2>α by model version</h2>", version_chart(
            report["versions"], "model_vs_consensus", "model vs consensus α on the items each version predicted")]
    return out


def _raters(report: dict[str, Any], limit: int = 200) -> str:
    """Which annotator is off? Per annotator, overall and per dimension; flagged annotators first."""
    names = report.get("raters") or []
    section = report.get("annotators") or {}
    people = section.get("annotators") or {}
    if not people:
        shown = ", ".join(esc(n) for n in names[:30]) + (f", … {len(names) - 30} more" if len(names) > 30 else "")
        return f"<p class=\"note\">Human raters ({len(names)}): {shown or 'none'}.</p>"
    order = sorted(people.items(), key=lambda kv: (not kv[1]["flagged"], -(kv[1]["n_labels"])))
    flagged = [n for n, a in order if a["flagged"] or a.get("flagged_dimensions")]
    summary = (f"<b>Flagged: {', '.join(esc(n) for n in flagged)}</b>." if flagged else "Nobody is flagged.")
    note = (f"<p class=\"note\">{len(people)} human annotators. {summary} α vs the others' consensus (the "
            "majority, or median, of the other annotators on the items they share) with a 95% bootstrap interval; "
            f"pairwise: α with each other annotator, weighted by shared items; leave-one-out: team α minus team α "
            f"without the annotator (negative: the team agrees better without). Rule: {esc(section.get('rule'))}."
            " Trend: α vs consensus on the annotator's first half of labels → second half (by time where known)."
            "</p>")
    head = ("<tr><th>annotator</th><th>labels</th><th>shared items</th><th>α vs others' consensus</th>"
            "<th>pairwise α</th><th>leave-one-out Δα</th><th>α vs model</th><th>golden accuracy</th>"
            "<th>α vs golden</th><th>trend (1st → 2nd half)</th><th>flag</th></tr>")
    rows = []
    for name, a in order[:limit]:
        o = a["overall"]
        gold = o["vs_golden"]
        flag = ("<td><b>flagged</b></td>" if a["flagged"] else
                f"<td>{'on ' + esc(', '.join(a['flagged_dimensions'])) if a.get('flagged_dimensions') else ''}"
                f"<span class=\"na\">{esc(o['vs_consensus'].get('reason') or '')}</span></td>")
        rows.append(f"<tr><td>{esc(name)}</td><td class=\"num\">{a['n_labels']}</td>"
                    f"<td class=\"num\">{o['n_shared']}</td>{cell(o['vs_consensus'])}{cell(o['pairwise'])}"
                    f"{cell(o['leave_one_out'])}{cell(o['vs_model'])}{_accuracy(gold)}{cell(gold)}"
                    f"<td class=\"num\">{_trend(o['trend'])}</td>{flag}</tr>")
    more = f"<p class=\"note\">… {len(order) - limit} more in the JSON.</p>" if len(order) > limit else ""
    return ("<h2 id=\"annotators\">Which annotator is off?</h2>" + note
            + f"<div class=\"wide\"><table class=\"annotators\">{head}{''.join(rows)}</table></div>{more}"
            + _rater_dimensions(section, order[:limit]) + _model_golden(section))


def _accuracy(entry: dict[str, Any]) -> str:
    acc = entry.get("accuracy")
    if acc is None:
        return f'<td class="na" title="{esc(entry.get("reason") or "no golden task")}">n/a</td>'
    return f'<td class="num">{acc:.3f} (n={entry.get("n")})</td>'


def _trend(trend: dict[str, Any]) -> str:
    a, b = trend.get("first_half"), trend.get("second_half")
    a = a.get("value") if isinstance(a, dict) else a
    b = b.get("value") if isinstance(b, dict) else b
    return "n/a" if a is None or b is None else f"{a:.2f} → {b:.2f}"


def _rater_dimensions(section: dict[str, Any], order: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """α vs the others' consensus per annotator and dimension; flagged cells in bold, team median last."""
    keys = list(section.get("team_median") or {})
    keys = [k for k in keys if k != "overall"]
    if len(keys) < 2:
        return ""
    head = "<tr><th>annotator</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
    rows = []
    for name, a in order:
        cells = []
        for k in keys:
            e = a["dimensions"].get(k)
            if e is None:
                cells.append('<td class="na">-</td>')
                continue
            c = cell(e["vs_consensus"])
            cells.append(c.replace('<td class="num">', '<td class="num flagged"><b>⚑ ').replace("</td>", "</b></td>")
                         if e.get("flagged") else c)
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    team = section.get("team_median") or {}
    rows.append("<tr><td><i>team median</i></td>" + "".join(number_cell(team.get(k)) for k in keys) + "</tr>")
    return ("<p class=\"note\">α vs the others' consensus per dimension (⚑: flagged on that dimension).</p>"
            f"<div class=\"wide\"><table>{head}{''.join(rows)}</table></div>")


def _model_golden(section: dict[str, Any]) -> str:
    if not section.get("n_golden"):
        return ("<p class=\"note\">No golden tasks (annotations marked ground truth in Label Studio): accuracy "
                "against known answers appears here once there are some.</p>")
    o = (section.get("model_vs_golden") or {}).get("overall") or {}
    acc = o.get("accuracy")
    what = (f"accuracy {acc:.3f} on {o.get('n')} golden answers" if acc is not None else
            f"α {o['value']:.3f}" if o.get("value") is not None else esc(o.get("reason") or "not computed"))
    return (f"<p class=\"note\">Golden tasks: {section['n_golden']}. The model against them: {what}. An "
            "annotator's own ground-truth annotation is not counted for that annotator.</p>")


def render_evaluate(report: dict[str, Any]) -> str:
    meta = _meta([("source", report.get("source")), ("items", report["n_items"]),
                  ("raters", len(report["raters"])), ("model", report.get("model") or "none"),
                  ("bootstrap resamples", report.get("n_boot")), ("generated", report.get("generated_at"))])
    return page(report["title"], agreement_sections(report), meta)


# -- learning curve --------------------------------------------------------------------------------------


def render_learning_curve(result: dict[str, Any]) -> str:
    sizes = [p["n_train"] for p in result["points"]]
    ticks = [(float(s), str(s)) for s in sizes]
    figures = [_dimension_curve(result, key, ticks) for key in result["dimensions"]]
    if len(figures) > 1:
        figures.insert(0, _mean_curve(result, ticks))
    meta = _meta([("data", result.get("dataset")), ("base model", result.get("base_model")),
                  ("test items", result.get("n_test")), ("training items", result.get("n_train_total")),
                  ("seeds", ", ".join(str(s) for s in result.get("seeds", []))),
                  ("generated", result.get("generated_at"))])
    note = ("<p class=\"note\">α of the trained adapter against each human rater (mean over raters, and over seeds), "
            "on a fixed held-out set, against the number of labelled training items. The humans' pairwise mean is "
            "the bar to reach; the untrained base model and a majority-class baseline (each dimension's most "
            "frequent training label) are the floor.</p>")
    return page(result.get("title") or "Learning curve", [
        "<h2>How many labels do we need?</h2>", note, f"<div class=\"grid\">{''.join(figures)}</div>",
        "<h2>Numbers</h2>", _curve_table(result)], meta)


def _curve_figure(title: str, ticks: list[tuple[float, str]], adapter: list[tuple[float, float | None, Any]],
                  majority: list[tuple[float, float | None, Any]], human: float | None, base: float | None) -> str:
    series = [Series("adapter", adapter, PALETTE[0]), Series("majority baseline", majority, MUTED, dashed=True)]
    refs = [(n, v, c) for n, v, c in (("humans, pairwise", human, INK), ("untrained base", base, PALETTE[3]))
            if v is not None]
    return (f"<figure><figcaption>{esc(title)}</figcaption>"
            + line_chart(series, ticks, "labelled training items", "α vs each human (mean)",
                         log_x=all(t[0] > 0 for t in ticks), references=refs, chart="learning-curve")
            + "</figure>")


def _dimension_curve(result: dict[str, Any], key: str, ticks: list[tuple[float, str]]) -> str:
    points, dim = result["points"], result["dimensions"][key]
    adapter = [(float(p["n_train"]), p["dimensions"][key]["adapter"], _tuple(p["dimensions"][key].get("adapter_ci")))
               for p in points]
    majority = [(float(p["n_train"]), p["dimensions"][key]["majority"], None) for p in points]
    return _curve_figure(dim.get("title") or key, ticks, adapter, majority, dim.get("human_pairwise"), dim.get("base"))


def _mean_curve(result: dict[str, Any], ticks: list[tuple[float, str]]) -> str:
    points = result["points"]
    return _curve_figure("mean over dimensions", ticks,
                         [(float(p["n_train"]), p.get("adapter_mean"), None) for p in points],
                         [(float(p["n_train"]), p.get("majority_mean"), None) for p in points],
                         result.get("human_pairwise_mean"), result.get("base_mean"))


def _tuple(ci: Any) -> tuple[float, float] | None:
    return (ci[0], ci[1]) if ci else None


def _curve_table(result: dict[str, Any]) -> str:
    keys = list(result["dimensions"])
    head = "<tr><th>training items</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "<th>mean</th></tr>"
    rows = [f"<tr><td>untrained base</td>{''.join(number_cell(result['dimensions'][k].get('base')) for k in keys)}"
            f"{number_cell(result.get('base_mean'))}</tr>",
            f"<tr><td>humans, pairwise</td>"
            f"{''.join(number_cell(result['dimensions'][k].get('human_pairwise')) for k in keys)}"
            f"{number_cell(result.get('human_pairwise_mean'))}</tr>"]
    for p in result["points"]:
        rows.append(f"<tr><td>{p['n_train']} (majority)</td>"
                    f"{''.join(number_cell(p['dimensions'][k]['majority']) for k in keys)}"
                    f"{number_cell(p.get('majority_mean'))}</tr>")
        rows.append(f"<tr><td>{p['n_train']}</td>{''.join(number_cell(p['dimensions'][k]['adapter']) for k in keys)}"
                    f"{number_cell(p.get('adapter_mean'))}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


# -- live project ----------------------------------------------------------------------------------------


def render_project(report: dict[str, Any]) -> str:
    p = report["project"]
    meta = _meta([("served", p["served"]), ("labels stored", p["labels"]), ("tasks labelled", p["tasks"]),
                  ("raters", p["raters"]), ("labels since last training", p["pending"]),
                  ("generated", report.get("generated_at"))])
    sections: list[str] = []
    if report.get("agreement"):
        sections += agreement_sections(report["agreement"])
    elif report.get("agreement_reason"):
        sections.append(f"<h2>Agreement per dimension</h2><p class=\"na\">{esc(report['agreement_reason'])}</p>")
    sections.append(_serving_table(p.get("serving")))
    if report.get("rater_weights"):
        sections.append(_rater_weights_table(report["rater_weights"]))
    sections += _adapter_sections(report.get("adapters") or [])
    if report.get("costs"):
        sections.append(_cost_table(report["costs"], report.get("hard_pool")))
    sections.append(_runs_table(report.get("runs") or []))
    sections.append(_bulk_table(report.get("bulk") or []))
    sections.append('<p class="note">The same numbers as JSON: <a href="'
                    f'{esc(report.get("json_url", ""))}">{esc(report.get("json_url", ""))}</a></p>')
    return page(f"Project {p['id']}: agreement report", sections, meta)


def _serving_table(plan: dict[str, Any] | None) -> str:
    """Which scorer answers each dimension, its measured alpha, and whether Label Studio gets a pre-filled value."""
    if not plan:
        return ("<h2>What is served</h2><p class=\"na\">No trained version yet: nothing is pre-filled until the "
                "first labels have been learnt.</p>")
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(d.get('source'))}</td>{number_cell(d.get('alpha'))}"
                   f"<td>{'yes' if d.get('prefill') else 'no: below the bar'}</td></tr>" for k, d in plan.items())
    return ("<h2>What is served</h2><table><tr><th>dimension</th><th>answered by</th><th>measured α</th>"
            f"<th>pre-filled</th></tr>{rows}</table>")


def _rater_weights_table(weights: dict[str, Any]) -> str:
    """How much each annotator's vote counts in training (RATER_WEIGHTING) on today's labels, per dimension."""
    def who(d: dict[str, Any]) -> str:
        if "unweighted" in d:
            return f"<td>every vote counts 1: {esc(d['unweighted'])}</td>"
        low = ", ".join(f"{esc(r)}: {w:.2f}" for r, w in d["down_weighted"].items())
        return f"<td>{low or 'every vote counts 1'}</td>"

    rows = "".join(f"<tr><td>{esc(k)}</td>{who(d)}</tr>" for k, d in weights.get("dimensions", {}).items())
    return (f"<h2>Rater weighting in training ({esc(weights.get('method'))})</h2><p class=\"note\">How much each "
            "annotator's vote counts in what the models learn if they trained on today's labels (a reliability "
            "estimated from who agreed with whom; 1 = a full vote).</p><table><tr><th>dimension</th>"
            f"<th>annotators counted less than one vote</th></tr>{rows}</table>")


def _adapter_sections(adapters: Sequence[dict[str, Any]]) -> list[str]:
    if not adapters:
        return ["<h2>Adapters</h2><p class=\"na\">No adapter trained yet: the base model is served.</p>"]
    rows = "".join(
        f"<tr><td>v{a['version']}</td><td>{esc(a['status'])}</td><td>{esc(a['created_at'])}</td>"
        f"{number_cell(a.get('score'))}{number_cell(a.get('current_score'))}<td class=\"num\">{a.get('train_tasks')}"
        f"</td><td class=\"num\">{a.get('heldout_tasks')}</td></tr>" for a in adapters)
    table = ("<table><tr><th>version</th><th>status</th><th>trained</th><th>held-out score</th>"
             "<th>score of the model it replaced</th><th>training tasks</th><th>held-out tasks</th></tr>"
             f"{rows}</table>")
    chart = version_chart(adapters, "model_vs_consensus",
                          "held-out α (model vs consensus) per dimension, by adapter version; open: not served now")
    return ["<h2>α by adapter version over time</h2>", chart, table]


ROUTE_NAMES = {"slm": "small model (every item)", "judge": "judge (uncertain items)",
               "human": "humans (uncertain items)"}


def _cost_table(costs: dict[str, Any], pool: int | None) -> str:
    """Items, tokens, compute and estimated cost per route, next to sending every item to the judge."""
    rows = "".join(
        f"<tr><td>{esc(ROUTE_NAMES.get(route, route))}</td><td class=\"num\">{r['items']}</td>"
        f"<td class=\"num\">{r['failures']}</td><td class=\"num\">{r['prompt_tokens']}</td>"
        f"<td class=\"num\">{r['completion_tokens']}</td>{number_cell(r['seconds'], 1)}{number_cell(r['cost'], 4)}</tr>"
        for route, r in sorted(costs["routes"].items()))
    everything = costs.get("all_to_judge_cost")
    compare = ("unknown until the judge has answered an item" if everything is None
               else f"{everything:.4f}")
    return ("<h2>Routes and cost</h2><table><tr><th>route</th><th>items</th><th>failures</th><th>tokens in</th>"
            f"<th>tokens out</th><th>compute s</th><th>estimated cost</th></tr>{rows}</table>"
            f"<p class=\"note\">Total {costs['total_cost']:.4f}; every item to the judge instead: {esc(compare)}. "
            f"Prices from PRICE_* settings. Hard samples waiting for continual fine-tuning: {pool or 0}.</p>")


def _runs_table(runs: Sequence[dict[str, Any]]) -> str:
    if not runs:
        return "<h2>Training runs</h2><p class=\"na\">No training run yet.</p>"
    rows = "".join(
        f"<tr><td>{r['id']}</td><td>{esc(r['trigger'])}</td><td>{esc(r['status'])}</td><td>{esc(r['started_at'])}"
        f"</td><td>{esc(r.get('finished_at') or '')}</td><td class=\"num\">{r['n_train']}</td>"
        f"<td class=\"num\">{r['n_heldout']}</td><td>{esc(r.get('error') or '')}</td></tr>" for r in reversed(runs))
    return ("<h2>Training runs</h2><table><tr><th>run</th><th>trigger</th><th>outcome</th><th>started</th>"
            f"<th>finished</th><th>training tasks</th><th>held-out tasks</th><th>detail</th></tr>{rows}</table>")


def _bulk_table(runs: Sequence[dict[str, Any]]) -> str:
    """Bulk prediction runs (whole-project pre-annotation, refresh after a promotion): progress, rate, ETA."""
    if not runs:
        return ("<h2>Bulk predictions</h2><p class=\"na\">No bulk prediction yet (<code>slm-annotator predict "
                "--project P</code>, or the refresh after a promotion).</p>")
    rows = "".join(
        f"<tr><td>{esc(r['model_version'])}</td><td>{esc(r['mode'])}</td><td>{esc(r['status'])}</td>"
        f"<td class=\"num\">{r['done']}/{r['total']}</td><td class=\"num\">{r['written']}</td>"
        f"<td class=\"num\">{r['errors']}</td><td class=\"num\">{r['workers']}</td>{number_cell(r['tasks_per_s'], 1)}"
        f"{number_cell(r['eta_s'], 0)}<td>{esc(r['started_at'])}</td><td>{esc(r.get('last_error') or '')}</td></tr>"
        for r in runs)
    return ("<h2>Bulk predictions</h2><table><tr><th>version</th><th>tasks</th><th>status</th><th>done</th>"
            "<th>written</th><th>errors</th><th>workers</th><th>tasks/s</th><th>ETA s</th><th>started</th>"
            f"<th>detail</th></tr>{rows}</table>")
