"""report.html: the whole report as one self-contained page, for readers without a terminal or a Markdown viewer.

One file that can be mailed or opened from a file:// URL offline: the figures are inlined as base64 PNG data:
URIs, the per-district tables sort by a click on a column header (a few lines of inline script), and the page's
Content-Security-Policy allows nothing but its own hashed style and script and data: images, so it loads no
external resource. It holds what table.md holds (the table with every column, mean ± interval cells over
seeds, headline, goals, fairness section per seed), each seed's headline numbers, the figures, and the
settings and stage times of `nfed demo` when they are known (passed by the demo, or RUN/demo.json).
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
from pathlib import Path

from nfed.report.comparison import Comparison
from nfed.report.heldout import heldout_line, heldout_pairs, heldout_summary
from nfed.report.matrix import matrix_line, matrix_summary, study_matrix
from nfed.report.run import Run, read_json_object
from nfed.report.text import cell_text, fairness_cells, fairness_header, goal_verdict, headline_lines, table_columns

DEMO_NAME = "demo.json"
FIGURE_CAPTIONS = {
    "fig3_f1_samples.png": "Samples and local F1 per district (the study's Fig. 3)",
    "fig3_gain_vs_samples.png": "Federated gain over local F1 against samples: do small districts gain most?",
    "fig4_before_after.png": "F1 per district in every column (the study's Fig. 4)",
    "fig5_f1_per_round.png": "The global model's validation F1 per round",
}
# Each seed's own headline numbers: (summary key, header, digits).
PER_SEED_COLUMNS = (("mean_f1_local", "mean F1 local", 4), ("mean_f1_federated", "mean F1 federated", 4),
                    ("mean_f1_personalised", "mean F1 personalised", 4),
                    ("mean_f1_centralised", "mean F1 centralised", 4), ("gain_on_means_pct", "gain on the means %", 1),
                    ("improved", "districts improved", None), ("corr_samples_gain", "corr(samples, gain)", 2))

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1b1f23; margin: 0 auto; max-width: 1600px; padding: 0 20px 40px; }
h1 { font-size: 1.5em; margin: 18px 0 4px; }
h2 { font-size: 1.2em; border-bottom: 1px solid #d0d7de; padding-bottom: 3px; margin-top: 28px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; white-space: nowrap; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child, table.text td, table.text th { text-align: left; }
thead th { background: #f3f4f6; white-space: normal; vertical-align: bottom; }
tbody tr:nth-child(even) { background: #f8f9fb; }
th button { font: inherit; font-weight: bold; background: none; border: 0; padding: 0; cursor: pointer; }
th button::after { content: " \\2195"; color: #8c959f; }
th[aria-sort=ascending] button::after { content: " \\2191"; color: #1b1f23; }
th[aria-sort=descending] button::after { content: " \\2193"; color: #1b1f23; }
.met { color: #1a7f37; font-weight: bold; }
.missed { color: #cf222e; font-weight: bold; }
.unmeasured { color: #6e7781; }
.warnings li { color: #9a6700; }
.note { color: #57606a; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 8px 20px; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; }
table.heatmap td { min-width: 2.6em; }
table.heatmap thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
table.heatmap thead th:first-child { writing-mode: horizontal-tb; transform: none; }
td.diag { outline: 2px solid #1b1f23; outline-offset: -2px; font-weight: bold; }
.hm0 { background: #f7fbff; } .hm1 { background: #e3eef9; } .hm2 { background: #cfe1f2; }
.hm3 { background: #b5d4e9; } .hm4 { background: #93c3df; } .hm5 { background: #6daed5; }
.hm6 { background: #4b97c9; color: #fff; } .hm7 { background: #2f7ebc; color: #fff; }
.hm8 { background: #1864aa; color: #fff; } .hm9 { background: #0a4a90; color: #fff; }
"""

# Sorts every table.sortable by the clicked column: by data-sort when the cell has it, else by its text;
# numbers compare as numbers, empty cells ("-") stay last in both directions, equal keys keep their order.
SCRIPT = """
(function () {
  "use strict";
  function key(row, column) {
    var cell = row.cells[column];
    var text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    return text === "-" ? "" : text;
  }
  function compare(a, b) {
    var x = parseFloat(a), y = parseFloat(b);
    if (!isNaN(x) && !isNaN(y)) { return x < y ? -1 : (x > y ? 1 : 0); }
    if (!isNaN(x) || !isNaN(y)) { return isNaN(x) ? 1 : -1; }
    return a.localeCompare(b);
  }
  function sortBy(table, header, column) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) {
      var a = key(r, column), b = key(s, column);
      if (a === "" || b === "") { return (a === "") - (b === ""); }
      return ascending ? compare(a, b) : compare(b, a);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) { cell.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
      header.querySelector("button").addEventListener("click", function () { sortBy(table, header, column); });
    });
  });
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Only the page's own style and script run, images only from data: URIs; nothing is fetched.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; img-src data:; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; "
                           f"base-uri 'none'; form-action 'none'")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _sort_key(value) -> str | None:
    """The data-sort attribute of a numeric cell: the exact value (not its rounded text), "" when absent."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value) if isinstance(value, (int, float)) else None


def _td(text, sort: str | None = None, css_class: str | None = None) -> str:
    """A cell; `sort` (data-sort) is the key the script sorts by instead of the text."""
    attributes = (f" data-sort=\"{_e(sort)}\"" if sort is not None else "") + \
        (f" class=\"{css_class}\"" if css_class else "")
    return f"<td{attributes}>{_e(text)}</td>"


def _table(header: list[str], rows: list[list[str]], *, sortable: bool = False, text: bool = False,
           heatmap: bool = False, table_id: str | None = None) -> str:
    """A table of _td cells; a sortable table gets a button in each header cell."""
    classes = " ".join(c for c, on in (("sortable", sortable), ("text", text), ("heatmap", heatmap)) if on)
    head = "".join(f"<th scope=\"col\"><button type=\"button\">{_e(h)}</button></th>" if sortable
                   else f"<th scope=\"col\">{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    attributes = (f" id=\"{table_id}\"" if table_id else "") + (f" class=\"{classes}\"" if classes else "")
    return (f"<div class=\"scroll\"><table{attributes}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n"
            f"</table></div>")


def _list(lines: list[str], css_class: str | None = None) -> str:
    attributes = f" class=\"{css_class}\"" if css_class else ""
    return f"<ul{attributes}>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"


def district_table(comparison: Comparison) -> str:
    """Every column of table.md, one row per district, sortable; cells keep the exact value to sort by."""
    columns = table_columns(comparison)
    rows = [[_td(cell_text(row, key, digits), _sort_key(row.get(key))) for key, _, digits in columns]
            for row in comparison.rows]
    return _table([header for _, header, _ in columns], rows, sortable=True, table_id="districts-table")


def goals_table(comparison: Comparison) -> str:
    verdict_class = {"yes": "met", "NO": "missed", "not measured": "unmeasured"}
    rows = [[_td(goal["target"]), _td(goal["measured"]), _td(goal_verdict(goal), None,
                                                             verdict_class[goal_verdict(goal)])]
            for goal in comparison.summary["goals"]]
    return _table(["goal of the fair re-run", "measured", "met"], rows, text=True)


def per_seed_table(comparison: Comparison) -> str:
    """Each seed's own headline numbers (the table above holds the seed means)."""
    per_seed = comparison.summary["per_seed"]
    columns = [c for c in PER_SEED_COLUMNS if any(c[0] in seed for seed in per_seed)]
    rows = [[_td(seed["run"])] + [_td(cell_text(seed, key, digits), _sort_key(seed.get(key)))
                                  for key, _, digits in columns] for seed in per_seed]
    return _table(["seed run"] + [header for _, header, _ in columns], rows, sortable=True)


def fairness_html(comparison: Comparison) -> str:
    parts = []
    for section in comparison.summary["fairness"]:
        header, cells = fairness_cells(section)
        parts += [f"<h3>Run {_e(section['run'])}</h3>", _list(fairness_header(section))]
        if section["warnings"]:
            parts.append(_list([f"warning: {w}" for w in section["warnings"]], "warnings"))
        parts.append(_table(header, [[_td(text) for text in row] for row in cells], sortable=True))
    return "\n".join(parts)


def figures_html(comparison: Comparison) -> str:
    """Each figure written for this report, inlined as a data: URI."""
    from PIL import Image

    paths = [Path(p) for p in comparison.summary.get("figures", [])]
    if not paths:
        return "<p class=\"note\">No figures: the report was written with --no-figures.</p>"
    parts = []
    for path in paths:
        caption = FIGURE_CAPTIONS.get(path.name, path.stem)
        with Image.open(path) as image:
            width, height = image.size
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" width=\"{width}\" height=\"{height}\" "
                     f"alt=\"{_e(caption)}\"><figcaption>{_e(path.name)}: {_e(caption)}</figcaption></figure>")
    return "<div class=\"figures\">\n" + "\n".join(parts) + "\n</div>"


def _heat_class(value: float | None) -> str:
    """The cell's colour class: F1 in tenths (hm0 light .. hm9 dark), none for a blank cell."""
    return "" if value is None else f"hm{min(9, max(0, int(value * 10 + 1e-9)))}"


def matrix_html(comparison: Comparison) -> str:
    """The cross-district matrix as a heatmap table (colour by F1 in tenths, the diagonal framed), and its means."""
    matrix, seeds = study_matrix(comparison.runs)
    if matrix is None:
        return ""
    summary = comparison.summary.get("matrix") or matrix_summary(comparison.runs)   # build_report's, once
    rows = [[_td(name)] + [_td("-" if value is None else f"{value:.2f}", None,
                               " ".join(c for c in (_heat_class(value), "diag" if district == name else "") if c))
                           for district, value in zip(matrix.districts, row)]
            for name, row in matrix.rows.items()]
    legend = _table([f"{k / 10:.1f}" for k in range(10)], [[_td("", None, f"hm{k}") for k in range(10)]])
    notes = ["Rows: each district's local model (named by its district) and the federation's kept global model; "
             "columns: the district whose test split it is scored on; cells: F1 of the change class pooled over "
             "the split's tiles, blank (-) where a model or pack is missing. Framed: a local model on its own "
             "district (in-district). Under --norm-policy fedbn / silobn the global model is scored on each "
             "district with that district's own BatchNorm of the kept round, as the district would use it.",
             f"In-district: mean of {summary['in_district_cells']} diagonal cells; out-of-district: mean of "
             f"{summary['out_of_district_cells']} other cells of the local models."
             + (f" Cells: the mean over the {seeds} seeds that have a matrix (nfed matrix / nfed demo)."
                if len(comparison.runs) > 1 else "")]
    return (_list([matrix_line(summary)]) + "".join(f"<p class=\"note\">{_e(n)}</p>" for n in notes)
            + _table(["model / district"] + matrix.districts, rows, heatmap=True, table_id="matrix-table")
            + "<p class=\"note\">Colour: F1 in tenths.</p>" + legend)


def heldout_html(comparison: Comparison) -> str:
    """Districts that never trained: each held-out district's test F1 under its own local model, the global model
    and the global model after AdaBN, per seed, with the summary line."""
    pairs = heldout_pairs(comparison.runs)
    if not pairs:
        return ""

    def cell(value):
        return _td("-" if value is None else f"{value:.4f}", _sort_key(value))

    rows = [[_td(label), _td(row["district"]), cell(row["local_f1"]), cell(row["global_f1"]),
             cell(row["adapted_f1"]),
             cell(None if row["adapted_f1"] is None or row["global_f1"] is None
                  else row["adapted_f1"] - row["global_f1"])] for label, row in pairs]
    note = ("Held out with --hold-out: never selected, never averaged, not in the stop rules' validation mean. "
            "Global: the federation's kept model; adapted: the same model with its BatchNorm statistics "
            "re-estimated on the district's own training tiles (AdaBN, no labels); local: the district's own model.")
    summary = comparison.summary.get("held_out") or heldout_summary(comparison.runs)   # build_report's, once
    return (_list([heldout_line(summary)]) + f"<p class=\"note\">{_e(note)}</p>"
            + _table(["run", "district", "local F1", "global F1", "adapted F1", "gain"], rows, sortable=True,
                     table_id="heldout-table"))


def _run_folder(run: Run) -> Path:
    """The study run folder that holds the run's results (RUN/local/local.csv)."""
    return run.sources["local"].parent.parent


def _lists_run(record: dict, folder: Path) -> bool:
    """Whether a demo.json of several seeds names `folder` (OUT/seed-<k>) among its runs."""
    runs = record.get("runs")
    return isinstance(runs, dict) and any(isinstance(entry, dict) and Path(str(entry.get("run", ""))).name
                                          == folder.name for entry in runs.values())


def find_demo_record(runs: list[Run]) -> tuple[dict | None, str]:
    """The demo.json of the runs (RUN/demo.json, or for a seed of several OUT/demo.json naming RUN) and where
    it came from; (None, why) when there is none, or when it is older than the results: the demo writes it
    last, so an older one belongs to an earlier demo in the same folder."""
    for run in runs:
        folder = _run_folder(run)
        for path in (folder / DEMO_NAME, folder.parent / DEMO_NAME):
            record = read_json_object(path)
            if not record or (path.parent != folder and not _lists_run(record, folder)):
                continue
            newest = max(p.stat().st_mtime for r in runs for p in r.sources.values() if p.is_file())
            if path.stat().st_mtime < newest:
                return None, f"{path} is older than the results, so it belongs to an earlier run: not shown."
            return record, f"from {path}"
    return None, f"No {DEMO_NAME} beside the run (the run was not made by nfed demo, or the demo is still running)."


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "-" if value is None else str(value)


def demo_html(demo: dict | None, source: str) -> str:
    """The demo's settings and wall time per stage (from demo.json or passed by the demo itself)."""
    if demo is None:
        return f"<p class=\"note\">{_e(source)}</p>"
    parts = [f"<p class=\"note\">Settings and stage times {_e(source)}.</p>"]
    settings = demo.get("settings")
    if isinstance(settings, dict) and settings:
        parts += ["<h3>Settings</h3>", _table(["setting", "value"], [[_td(k), _td(_setting(v))]
                                                                      for k, v in settings.items()], text=True)]
    stages = demo.get("stage_seconds")
    if isinstance(stages, dict) and stages:
        seconds = {name: float(s) for name, s in stages.items() if isinstance(s, (int, float))}
        total = demo.get("total_seconds") if isinstance(demo.get("total_seconds"), (int, float)) \
            else sum(seconds.values())
        rows = [[_td(name), _td(f"{s:.1f}"), _td(f"{100 * s / total:.1f}" if total else "-")]
                for name, s in seconds.items()]
        parts += ["<h3>Stage times (wall clock)</h3>", _table(["stage", "seconds", "share %"], rows)
                  + f"\n<p>total {float(total):.1f} s ({float(total) / 60:.1f} min)</p>"]
    return "\n".join(parts)


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id=\"{anchor}\">\n<h2>{_e(title)}</h2>\n{body}\n</section>"


def report_html(comparison: Comparison, demo: dict | None = None) -> str:
    """The page. `demo`: the demo's settings and stage times when the caller knows them (else demo.json)."""
    demo, source = (demo, "from nfed demo") if demo is not None else find_demo_record(comparison.runs)
    title = "nfed: " + ", ".join(comparison.columns) + " F1 per district (study Table 4)"
    runs = ", ".join(run.label for run in comparison.runs)
    warnings = comparison.summary["warnings"]
    how_to_read = "Click a column header to sort by it (again to reverse)." + (
        " Cells over seeds: seed mean ± half-width of the 95 % Student-t interval." if comparison.seeds else "")
    sections = [("headline", "Headline and goals", _list(headline_lines(comparison)) + goals_table(comparison)),
                ("districts", "Per district", f"<p class=\"note\">{_e(how_to_read)}</p>" + district_table(comparison))]
    if comparison.seeds:
        sections.append(("seeds", "Each seed", per_seed_table(comparison)))
    matrix = matrix_html(comparison)
    if matrix:
        sections.append(("matrix", "Cross-district matrix", matrix))
    heldout = heldout_html(comparison)
    if heldout:
        sections.append(("heldout", "Districts that never trained", heldout))
    sections += [("figures", "Figures", figures_html(comparison)),
                 ("fairness", "Fairness", fairness_html(comparison)),
                 ("settings", "Settings and stage times", demo_html(demo, source))]
    nav = "".join(f"<a href=\"#{anchor}\">{_e(name)}</a>" for anchor, name, _ in sections)
    summary = (f"Runs: {_e(runs)}. {len(comparison.rows)} districts"
               + (f", {len(comparison.seeds)} seeds" if comparison.seeds else "")
               + (f". <a href=\"#fairness\">{len(warnings)} fairness warning(s)</a>." if warnings
                  else ". No fairness warning."))
    return "\n".join([
        "<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CONTENT_SECURITY_POLICY}\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">", f"<title>{_e(title)}</title>",
        f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>", f"<p>{summary}</p>",
        f"<nav>{nav}</nav>", *(_section(*s) for s in sections), f"<script>{SCRIPT}</script>", "</body>", "</html>", ""])
