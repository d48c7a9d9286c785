"""report.html, parsed here as a reader's browser would see its content: every part of the report, figures inlined,
nothing external, names escaped, the demo's settings and stage times (a slow test opens it in a real browser)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from report_runs import NAMES, districts, make_run

from nfed.cli import cli
from nfed.common.errors import DataError
from nfed.report.build import make_report, make_study_report
from nfed.report.text import cell_text, headline_lines, table_columns


class Page(HTMLParser):
    """The parts of the page the tests look at: tables (header texts, rows of (text, attributes)), images,
    list items, paragraphs, headings, the style and script texts, the Content-Security-Policy, every tag and
    URL used."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.tags, self.urls = [], [], set(), []
        self.texts = {"li": [], "p": [], "h2": [], "h3": []}
        self.style = self.script = self.csp = None
        self._text: list[str] | None = None
        self._cell_attrs: dict = {}
        self._raw: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [attrs[k] for k in ("src", "href", "action") if k in attrs]
        if tag == "table":
            self.tables.append({"id": attrs.get("id"), "class": attrs.get("class", ""), "header": [], "rows": []})
        elif tag == "tbody":
            self.tables[-1]["in_body"] = True
        elif tag == "tr" and self.tables[-1].get("in_body"):
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th", *self.texts):
            self._text, self._cell_attrs = [], attrs
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
            self.csp = attrs["content"]
        elif tag in ("style", "script"):
            self._raw = tag

    def handle_endtag(self, tag):
        if self._text is not None and tag in ("td", "th", *self.texts):
            text, self._text = "".join(self._text).strip(), None
            if tag == "th":
                self.tables[-1]["header"].append(text)
            elif tag == "td":
                self.tables[-1]["rows"][-1].append((text, self._cell_attrs))
            else:
                self.texts[tag].append(text)
        elif tag in ("style", "script"):
            self._raw = None

    def handle_data(self, data):
        if self._raw:
            setattr(self, self._raw, (getattr(self, self._raw) or "") + data)
        if self._text is not None:
            self._text.append(data)

    def table(self, table_id: str) -> dict:
        return next(t for t in self.tables if t["id"] == table_id)


def read_page(report_dir: Path) -> Page:
    return Page((report_dir / "report.html").read_text(encoding="utf-8"))


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_page_holds_every_part_of_the_seed_report(tmp_path):
    runs = [make_run(tmp_path / f"s{k}", districts(0.05 * k, **({NAMES[1]: {"test_tiles": 5}} if k else {})))
            for k in range(2)]
    comparison = make_study_report(runs, tmp_path / "rep")
    page = read_page(tmp_path / "rep")
    table = page.table("districts-table")
    columns = table_columns(comparison)
    assert table["header"] == [header for _, header, _ in columns] and "sortable" in table["class"]
    assert len(table["rows"]) == len(comparison.rows) == 4
    for row, cells in zip(comparison.rows, table["rows"]):
        assert [text for text, _ in cells] == [cell_text(row, key, digits) for key, _, digits in columns]
        # the script sorts by the exact value, not by the rounded "mean ± half-width" text
        assert float(cells[2][1]["data-sort"]) == row["f1_local"] and " ± " in cells[2][0]
    seeds = [t for t in page.tables if t["header"][:1] == ["seed run"]]
    assert [cells[0][0] for cells in seeds[0]["rows"]] == ["s0", "s1"]
    assert all(line in page.texts["li"] for line in headline_lines(comparison))
    goals = next(t for t in page.tables if t["header"] == ["goal of the fair re-run", "measured", "met"])
    assert [cells[2][0] for cells in goals["rows"]] == ["NO", "yes", "yes", "yes", "NO"]
    assert "Run s0" in page.texts["h3"] and "Run s1" in page.texts["h3"]
    fairness = [t for t in page.tables if t["header"][:2] == ["district", "test tiles"]]
    assert [[cells[1][0] for cells in t["rows"]] for t in fairness] == [["30"] * 4, ["30", "5", "30", "30"]]
    assert any(item.startswith("warning: 1 district(s) have a test split too small") for item in page.texts["li"])
    # figures: the PNG files themselves, inlined
    figures = [Path(p) for p in comparison.summary["figures"]]
    assert len(page.images) == len(figures) == 4
    for image, path in zip(page.images, figures):
        assert image["src"] == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        assert image["alt"]


def test_page_loads_nothing_from_outside(tmp_path):
    make_study_report([make_run(tmp_path / "run", districts())], tmp_path / "rep")
    page = read_page(tmp_path / "rep")
    assert page.urls and all(url.startswith(("data:image/png;base64,", "#")) for url in page.urls)
    assert not {"link", "iframe", "object", "embed", "base"} & page.tags
    # the policy lets exactly this style and script run (a hash that does not match would block sorting)
    policy = dict(part.strip().split(" ", 1) for part in page.csp.split(";"))
    assert policy["default-src"] == "'none'" and policy["img-src"] == "data:"
    assert policy["script-src"] == _sha256(page.script) and policy["style-src"] == _sha256(page.style)


def test_names_are_escaped(tmp_path):
    evil = "<i>Evil & co</i>"
    entries = districts() + [{"name": evil, "samples": 10, "local": 0.3, "federated": 0.4, "personalised": 0.4,
                              "centralised": 0.5}]
    make_study_report([make_run(tmp_path / "a<b>&c", entries)], tmp_path / "rep", figures=False)
    page = read_page(tmp_path / "rep")
    assert "i" not in page.tags and "b" not in page.tags
    assert page.table("districts-table")["rows"][-1][0][0] == evil
    assert any("Runs: a<b>&c." in p for p in page.texts["p"]) and "Run a<b>&c" in page.texts["h3"]


def test_missing_values_infinite_gain_and_no_figures(tmp_path):
    entries = districts(**{NAMES[0]: {"local": 0.0}, NAMES[1]: {"personalised": None}})
    make_report(make_run(tmp_path / "run", entries) / "local", tmp_path / "run" / "federated", tmp_path / "rep",
                personalised=tmp_path / "run" / "personalised", figures=False)
    page = read_page(tmp_path / "rep")
    rows = page.table("districts-table")["rows"]
    header = page.table("districts-table")["header"]
    gain = rows[0][header.index("gain % federated")]
    assert gain == ("inf", {"data-sort": "Infinity"})
    assert rows[1][header.index("F1 personalised")] == ("-", {"data-sort": ""})
    assert not page.images and "No figures: the report was written with --no-figures." in page.texts["p"]


def _write_demo(path: Path, runs: dict | None = None) -> None:
    record = {"settings": {"scale": 0.0125, "seeds": [0, 1], "lr": None},
              "stage_seconds": {"data": 3.0, "local": 27.0, "federated": 60.0}, "total_seconds": 90.0}
    path.write_text(json.dumps({**record, **({"runs": runs} if runs is not None else {})}))


def _settings(page: Page) -> dict:
    table = next((t for t in page.tables if t["header"] == ["setting", "value"]), None)
    return {} if table is None else {cells[0][0]: cells[1][0] for cells in table["rows"]}


def test_demo_settings_and_stage_times(tmp_path):
    run = make_run(tmp_path / "run", districts())
    make_study_report([run], tmp_path / "rep0", figures=False)
    assert "No demo.json beside the run" in (tmp_path / "rep0" / "report.html").read_text()
    _write_demo(run / "demo.json")
    make_study_report([run], tmp_path / "rep", figures=False)
    page = read_page(tmp_path / "rep")
    assert _settings(page) == {"scale": "0.0125", "seeds": "0, 1", "lr": "-"}
    stages = next(t for t in page.tables if t["header"] == ["stage", "seconds", "share %"])
    assert [[text for text, _ in cells] for cells in stages["rows"]] == [
        ["data", "3.0", "3.3"], ["local", "27.0", "30.0"], ["federated", "60.0", "66.7"]]
    assert "total 90.0 s (1.5 min)" in (tmp_path / "rep" / "report.html").read_text()
    # the demo writes demo.json last: one older than the results is an earlier demo's, and is not shown
    old = (run / "local" / "local.csv").stat().st_mtime - 60
    os.utime(run / "demo.json", (old, old))
    make_study_report([run], tmp_path / "rep2", figures=False)
    assert _settings(read_page(tmp_path / "rep2")) == {}
    assert "older than the results, so it belongs to an earlier run" in (tmp_path / "rep2" / "report.html").read_text()
    # what the demo passes wins over any file
    make_study_report([run], tmp_path / "rep3", figures=False, demo={"settings": {"scale": 0.5}})
    assert _settings(read_page(tmp_path / "rep3")) == {"scale": "0.5"}


def test_demo_json_of_several_seeds(tmp_path):
    out = tmp_path / "out"
    runs = [make_run(out / f"seed-{k}", districts(0.05 * k)) for k in range(2)]
    _write_demo(out / "demo.json", runs={"0": {"run": str(runs[0])}, "1": {"run": str(runs[1])}})
    make_study_report(runs, tmp_path / "rep", figures=False)
    assert _settings(read_page(tmp_path / "rep"))["seeds"] == "0, 1"
    # a demo.json in the parent folder that does not name the run is someone else's
    _write_demo(out / "demo.json", runs={"0": {"run": str(tmp_path / "elsewhere" / "seed-7")}})
    make_study_report(runs, tmp_path / "rep2", figures=False)
    assert _settings(read_page(tmp_path / "rep2")) == {}


def test_command_line_writes_the_page_and_rejects_a_broken_demo_json(tmp_path):
    run = make_run(tmp_path / "run", districts())
    result = CliRunner().invoke(cli, ["report", "--run", str(run), "--out", str(tmp_path / "rep"), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'rep' / 'report.html'}" in result.stdout
    assert len(read_page(tmp_path / "rep").table("districts-table")["rows"]) == 4
    (run / "demo.json").write_text("{not json")
    with pytest.raises(DataError, match="demo.json: not valid JSON"):
        make_study_report([run], tmp_path / "rep2", figures=False)
    result = CliRunner().invoke(cli, ["report", "--run", str(run), "--out", str(tmp_path / "rep2")])
    assert result.exit_code == 1 and "demo.json: not valid JSON" in result.output and "Traceback" not in result.output
