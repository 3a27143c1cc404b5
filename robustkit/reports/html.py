"""``index.html``: one self-contained page with the summary tables, every plot and links to the record files.

The page is HTML5 with its style sheet inline and nothing loaded from elsewhere (no scripts, web fonts or
remote style sheets), so it reads offline and from a copied folder. Images and links use relative paths. Every
text taken from the records (trainer labels, configurations, folder names) is escaped, and the page holds no
date, so the same records give the same bytes.

>>> escape_text('<b>"mixtrain" & co</b>')
'&lt;b&gt;&quot;mixtrain&quot; &amp; co&lt;/b&gt;'
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pandas as pd

from robustkit.reports.records import RunRecords, ordered_unique
from robustkit.reports.summary import (
    ACCURACY_NOTE,
    INTERVAL_NOTE,
    TABLE_HEADERS,
    complete_note,
    group_title,
    iter_groups,
    sample_count,
    table_cells,
)

if TYPE_CHECKING:
    from robustkit.reports.plots import PlotSpec

__all__ = ["INDEX_HTML", "escape_text", "render_index", "write_index"]

INDEX_HTML = "index.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 72rem; padding: 1rem 1.5rem 3rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; }
p.note { background: #f6f8fa; border-left: 4px solid #8c959f; padding: 0.5rem 0.8rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; }
th { background: #f6f8fa; }
th[scope="row"] { text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: 0.9rem; color: #57606a; }
code { font-size: 0.85rem; word-break: break-all; }
ul.files li { margin: 0.15rem 0; }
""".strip()


def escape_text(text: object) -> str:
    """``text`` safe inside HTML text and quoted attribute values."""
    return html.escape(str(text), quote=True)


def _href(relative: str) -> str:
    return escape_text(quote(relative, safe="/"))


def _anchor(group: tuple[str, str, float]) -> str:
    return "group-" + quote(f"{group[0]}-{group[1]}-{group[2]:g}", safe="").replace("%", "_")


def _table(group: pd.DataFrame) -> list[str]:
    lines = ['<div class="scroll"><table>', "<thead><tr>"]
    lines += [f'<th scope="col">{escape_text(h)}</th>' for h in TABLE_HEADERS]
    lines += ["</tr></thead>", "<tbody>"]
    for _, row in group.iterrows():
        trainer, *values = table_cells(row)
        cells = [f'<th scope="row">{escape_text(trainer)}</th>']
        cells += [f'<td class="num">{escape_text(v)}</td>' for v in values]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table></div>"]
    return lines


def _figure(spec: PlotSpec) -> list[str]:
    alt = spec.title
    return [
        "<figure>",
        f'<img src="{_href(spec.stem + ".png")}" alt="{escape_text(alt)}" loading="lazy">',
        f'<figcaption>{escape_text(spec.caption)} '
        f'<a href="{_href(spec.stem + ".pdf")}">PDF</a></figcaption>',
        "</figure>",
    ]


def _run_facts(records: RunRecords) -> list[str]:
    results = records.results
    facts = []
    for column, label in (("robustkit_version", "robustkit"), ("torch_version", "torch")):
        versions = [v for v in ordered_unique(results[column]) if v]
        if versions:
            facts.append(f"{label} {', '.join(versions)}")
    seeds = ordered_unique(int(s) for s in results["seed"])
    if seeds:
        facts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}")
    cells = results.drop_duplicates(["dataset", "model", "trainer", "train_eps"])
    facts.append(f"{len(cells)} evaluated cell{'s' if len(cells) != 1 else ''}")
    return facts


def _configurations(records: RunRecords) -> list[str]:
    cells = records.results.drop_duplicates(["dataset", "model", "trainer", "train_eps"])
    if cells.empty:
        return []
    lines = ["<details>", "<summary>Cell configurations</summary>", '<div class="scroll"><table>',
             "<thead><tr>" + "".join(f'<th scope="col">{h}</th>' for h in
                                     ("Cell", "Trainer", "Seed", "Configuration")) + "</tr></thead>", "<tbody>"]
    for _, cell in cells.iterrows():
        title = f"{group_title(cell['dataset'], cell['model'], float(cell['train_eps']))} / {cell['trainer']}"
        lines.append(
            f"<tr><td>{escape_text(title)}</td><td>{escape_text(cell['trainer_name'])}</td>"
            f'<td class="num">{int(cell["seed"])}</td><td><code>{escape_text(cell["config"])}</code></td></tr>'
        )
    lines += ["</tbody>", "</table></div>", "</details>"]
    return lines


def render_index(
    records: RunRecords, summary: pd.DataFrame, plots: Sequence[PlotSpec], links: Sequence[str]
) -> str:
    """The page: the accuracy note, the record files ``links`` (paths relative to the run folder), then per
    dataset, model and training eps its summary table (from :func:`~robustkit.reports.summary.summary_frame`)
    and its ``plots`` (from :func:`~robustkit.reports.plots.plan_plots`, whose PNG files must exist)."""
    name = records.run_dir.resolve().name or str(records.run_dir)
    heading = f"Benchmark report: {name}"
    lines = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape_text(heading)}</title>", f"<style>\n{STYLE}\n</style>", "</head>", "<body>",
        "<header>", f"<h1>{escape_text(heading)}</h1>",
        f"<p>{escape_text('; '.join(_run_facts(records)))}.</p>", "</header>", "<main>",
        f'<p class="note">{escape_text(ACCURACY_NOTE)}</p>',
        f'<p class="note">{escape_text(INTERVAL_NOTE)}</p>',
    ]
    if links:
        lines.append('<nav><ul class="files">')
        lines += [f'<li><a href="{_href(link)}">{escape_text(link)}</a></li>' for link in links]
        lines.append("</ul></nav>")
    tables = dict(iter_groups(summary))
    groups = ordered_unique([*tables, *(spec.group for spec in plots)])
    if not groups:
        lines.append("<p>No cell has been trained or evaluated yet.</p>")
    for group in groups:
        lines += [f'<section id="{escape_text(_anchor(group))}">', f"<h2>{escape_text(group_title(*group))}</h2>"]
        if group in tables:
            lines.append(f"<p>{escape_text(sample_count(tables[group]))}.</p>")
            lines += _table(tables[group])
            lines.append(f'<p class="note">{escape_text(complete_note(tables[group]))}</p>')
        else:
            lines.append("<p>Not evaluated yet.</p>")
        for spec in plots:
            if spec.group == group:
                lines += _figure(spec)
        lines.append("</section>")
    lines += _configurations(records)
    lines += ["</main>", "</body>", "</html>", ""]
    return "\n".join(lines)


def write_index(
    out_dir: str | os.PathLike[str],
    records: RunRecords,
    summary: pd.DataFrame,
    plots: Sequence[PlotSpec],
    links: Sequence[str],
) -> Path:
    """Write :func:`render_index` to ``out_dir/index.html`` atomically; returns the path."""
    from robustkit.io import atomic_write_text

    return atomic_write_text(Path(out_dir) / INDEX_HTML, render_index(records, summary, plots, links))
