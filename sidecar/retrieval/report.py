"""The relevance report: JSON, a Markdown table, PNG plots (matplotlib) and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ir_measures

from sidecar.retrieval.relevance import ConfigResult, Evaluation

_PLOT_DPI = 110
_BOLD = re.compile(r"\*\*(.+?)\*\*")  # Markdown bold in a cell -> <b> in HTML
_BOLD_HTML = r"<b>\1</b>"
_READABLE = {"RR": "MRR", "R": "Recall", "AP": "MAP"}  # ir-measures' names the report spells out


@dataclass(frozen=True, slots=True)
class ReportFiles:
    json: Path
    markdown: Path
    plots: list[Path]
    html: Path


def label(measure: str, *, among: Sequence[str] = ()) -> str:
    """Reader's names for ir-measures' strings: RR(rel=2)@10 -> MRR@10, R(rel=2)@10 -> Recall@10. The grade
    (`rel`: the report's facts list every measure in full) is left out unless another measure of `among`
    would then read the same (R@10 beside R(rel=2)@10: Recall@10 and Recall(rel=2)@10, not two columns of
    Recall@10); other parameters change what is measured and stay (nDCG(judged_only=True)@10)."""
    def shown(text: str, *, rel: bool) -> str:
        parsed = ir_measures.parse_measure(text)
        params = {key: value for key, value in parsed.params.items() if rel or key != "rel"}
        written = str(ir_measures.parse_measure(parsed.NAME)(**params))
        return _READABLE.get(parsed.NAME, parsed.NAME) + written[len(parsed.NAME):]

    short = shown(measure, rel=False)
    clash = any(other != measure and shown(other, rel=False) == short for other in among)
    return shown(measure, rel=True) if clash else short


Table = tuple[list[str], list[list[str]]]  # header, rows of cells (already formatted)


def results_table(evaluation: Evaluation, *, groups: Sequence[str] | None = None) -> Table:
    """One row per configuration: every measure (the best in bold), the primary measure per group,
    latency p50/p95 per query (total)."""
    primary = evaluation.measures[0]
    groups = list(evaluation.groups) if groups is None else list(groups)
    header = (["configuration"] + [label(m, among=evaluation.measures) for m in evaluation.measures]
              + [f"{label(primary, among=evaluation.measures)} {g}" for g in groups] + ["p50 ms", "p95 ms"])
    best = {m: max(r.metrics[m] for r in evaluation.results) for m in evaluation.measures}
    rows = []
    for result in evaluation.results:
        # A note says the row did not run as its name says (a rerank skipped): point to it.
        cells = [result.config.name + (" (see notes)" if result.notes else "")]
        cells += [f"**{result.metrics[m]:.3f}**" if result.metrics[m] >= best[m] - 1e-12
                  else f"{result.metrics[m]:.3f}" for m in evaluation.measures]
        cells += [f"{result.by_group[g][primary]:.3f}" for g in groups]
        p50, p95 = result.latency_ms["total"]
        rows.append(cells + [f"{p50:.2f}", f"{p95:.2f}"])
    return header, rows


def notes_table(evaluation: Evaluation) -> Table:
    """Each configuration's notes (why a requested rerank was skipped), one row per note; no rows without."""
    return ["configuration", "note"], [[r.config.name, note] for r in evaluation.results for note in r.notes]


def latency_table(evaluation: Evaluation) -> Table:
    """Per-stage latency, p50 / p95 ms per query: encode (query vector), coarse, rerank, total."""
    stages = list(evaluation.results[0].latency_ms) if evaluation.results else []
    rows = [[r.config.name] + [f"{r.latency_ms[s][0]:.2f} / {r.latency_ms[s][1]:.2f}" for s in stages]
            for r in evaluation.results]
    return ["configuration", *(f"{s} p50 / p95" for s in stages)], rows


def defaults_table(evaluation: Evaluation) -> Table:
    """The default request against the best configuration, per query group, on the primary measure."""
    primary = label(evaluation.measures[0], among=evaluation.measures)
    rows = [[group, f"{gap['default']:.3f}", f"{gap['best']:.3f}", gap["best_configuration"],
             f"{gap['gap_points']:.1f}"] for group, gap in evaluation.default_gaps().items()]
    return ["queries", f"default {primary}", f"best {primary}", "best configuration", "gap (points)"], rows


def markdown(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_BOLD.sub(_BOLD_HTML, html.escape(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# What a judged run's report writes beside results.json and results.md.
_METRICS_PLOT, _LATENCY_PLOT, _HTML_PAGE = "metrics.png", "quality-latency.png", "report.html"


def write_report(evaluation: Evaluation, out: Path | str, *, title: str) -> ReportFiles:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(evaluation.to_json(), indent=2) + "\n", encoding="utf-8")
    markdown = _markdown(evaluation, title)
    markdown_path = out / "results.md"
    markdown_path.write_text(markdown, encoding="utf-8")
    plots = [plot_metric_per_configuration(evaluation, out / _METRICS_PLOT),
             plot_quality_against_latency(evaluation, out / _LATENCY_PLOT)]
    html_path = out / _HTML_PAGE
    html_path.write_text(_html(evaluation, title, plots), encoding="utf-8")
    return ReportFiles(json=json_path, markdown=markdown_path, plots=plots, html=html_path)


def write_results_only(out: Path, results: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """results.json and results.md alone (`eval --ann`, `eval --prompts`), in a folder `writable_folder` made.
    The plots and HTML page of a judged run's report written there before are removed: beside these, they would
    stand as this run's."""
    for name in (_METRICS_PLOT, _LATENCY_PLOT, _HTML_PAGE):
        (out / name).unlink(missing_ok=True)
    json_path, markdown_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    markdown_path.write_text(markdown, encoding="utf-8")
    return json_path, markdown_path


def _sections(evaluation: Evaluation) -> list[tuple[str, Table]]:
    sections = [("Results", results_table(evaluation))]
    notes = notes_table(evaluation)
    if notes[1]:
        sections.append(("Notes", notes))
    if evaluation.default:
        sections.append((f"The default request ({evaluation.default}) against the best configuration",
                         defaults_table(evaluation)))
    sections.append(("Latency per stage (ms per query)", latency_table(evaluation)))
    return sections


def _facts(evaluation: Evaluation) -> list[str]:
    groups = ", ".join(f"{name} {count}" for name, count in evaluation.groups.items())
    return ([f"{key}: {value}" for key, value in evaluation.info.items()]
            + [f"judged queries: {evaluation.queries} ({groups})",
               f"measures (ir-measures): {', '.join(evaluation.measures)}"])


def _markdown(evaluation: Evaluation, title: str) -> str:
    parts = [f"# {title}", "\n".join(f"- {fact}" for fact in _facts(evaluation))]
    for heading, table in _sections(evaluation):
        parts += [f"## {heading}", markdown(table)]
    return "\n\n".join(parts) + "\n"


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: no global state, no GUI backend, safe in a server or a test.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_PLOT_DPI, layout="constrained")


def plot_metric_per_configuration(evaluation: Evaluation, path: Path) -> Path:
    """Horizontal bars: the primary measure per configuration, overall and per query group."""
    primary = evaluation.measures[0]
    results = evaluation.results
    groups = list(evaluation.groups)
    series = [("all", [r.metrics[primary] for r in results])] + [
        (g, [r.by_group[g][primary] for r in results]) for g in groups]
    figure = _figure(10.0, 1.2 + 0.2 * len(results) * len(series))
    axes = figure.add_subplot()
    height = 0.8 / len(series)
    for index, (name, values) in enumerate(series):
        positions = [row + (index - (len(series) - 1) / 2) * height for row in range(len(results))]
        axes.barh(positions, values, height=height, label=name)
    axes.set_yticks(range(len(results)), [r.config.name for r in results], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    primary_label = label(primary, among=evaluation.measures)
    axes.set_xlabel(primary_label)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="queries", title_fontsize=8)
    axes.set_title(f"{primary_label} per configuration ({evaluation.queries} judged queries)")
    figure.savefig(path)
    return path


def sweeps(results: Sequence[ConfigResult]) -> dict[str, list[ConfigResult]]:
    """Configurations that differ only in ef_search or in candidates N, grouped as one line each."""
    lines: dict[str, list[ConfigResult]] = {}
    for varied in ("ef_search", "candidates"):
        families: dict[tuple, list[ConfigResult]] = {}
        for result in results:
            parameters = result.config.parameters()
            key = tuple((k, json.dumps(v)) for k, v in parameters.items() if k != varied)
            families.setdefault(key, []).append(result)
        for family in families.values():
            family = [f for f in family if f.config.parameters()[varied] is not None]  # None: the store's default
            values = {f.config.parameters()[varied] for f in family}
            if len(values) > 1:
                family = sorted(family, key=lambda f: f.config.parameters()[varied])
                first = family[0].config.name
                lines[f"{varied} {'/'.join(str(f.config.parameters()[varied]) for f in family)}: {first}"] = family
    return lines


def plot_quality_against_latency(evaluation: Evaluation, path: Path) -> Path:
    """Recall against p50 search latency per query (coarse + rerank; query encoding, the same for
    every point of a sweep, left out): every configuration a point named, sweeps of ef_search or N a line;
    the machine in the title (a latency means nothing without it, and the PNG travels alone)."""
    quality_latency_figure(evaluation).savefig(path)
    return path


def quality_latency_figure(evaluation: Evaluation):
    """The figure `plot_quality_against_latency` saves."""
    recall = next((m for m in evaluation.measures if label(m).startswith("Recall")), evaluation.measures[0])
    figure = _figure(9.0, 5.0)
    axes = figure.add_subplot()
    lines = sweeps(evaluation.results)
    on_a_line = {id(f) for family in lines.values() for f in family}
    for result in evaluation.results:
        x, y = result.latency_ms["search"][0], result.metrics[recall]
        axes.scatter(x, y, s=18, color="0.6", zorder=2)
        if id(result) not in on_a_line:  # a point of a sweep is named by its line and its value
            axes.annotate(result.config.name, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
    for name, family in lines.items():
        xs = [f.latency_ms["search"][0] for f in family]
        ys = [f.metrics[recall] for f in family]
        axes.plot(xs, ys, marker="o", label=name, zorder=3)
        varied = "ef_search" if name.startswith("ef_search") else "candidates"
        for f, x, y in zip(family, xs, ys):
            axes.annotate(str(f.config.parameters()[varied]), (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    axes.set_xlabel("search latency per query, p50 ms (coarse + rerank; query encoding left out)")
    recall_label = label(recall, among=evaluation.measures)
    axes.set_ylabel(recall_label)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower right")
    machine = evaluation.info.get("machine")
    axes.set_title(f"{recall_label} against latency" + (f"\n{machine}" if machine else ""), fontsize=10)
    return figure


def _html(evaluation: Evaluation, title: str, plots: Sequence[Path]) -> str:
    """One file, nothing fetched: the tables as HTML, the plots inlined as data: URIs."""
    facts = "".join(f"<li>{html.escape(fact)}</li>" for fact in _facts(evaluation))
    sections = "".join(f"<h2>{html.escape(heading)}</h2>{_html_table(table)}"
                       for heading, table in _sections(evaluation))
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"></figure>' for p in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{facts}</ul>
{sections}
{images}
</body></html>
"""
