"""report.html in a real headless Chromium: no console error, every figure shown, one row per district, sorting by
a click on a header, and a screenshot under the test's output. Slow (starts a browser); skipped where no
Chromium is installed (.ci/run installs Debian's)."""
from __future__ import annotations

import math

import pytest
from headless_browser import HeadlessChromium, find_chromium
from report_runs import NAMES, districts, make_run

from nfed.report.build import make_study_report

pytestmark = pytest.mark.slow

ROWS = "Array.from(document.querySelectorAll('#districts-table tbody tr'))"


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium, or set NFED_CHROMIUM)")
    return path


def _click(browser: HeadlessChromium, header: str) -> tuple[list[str], str]:
    """Click a header of the district table; the district order after it and the header's aria-sort."""
    headers = browser.evaluate("Array.from(document.querySelectorAll('#districts-table thead th'), "
                               "th => th.textContent.trim())")
    column = headers.index(header)
    browser.evaluate(f"document.querySelectorAll('#districts-table thead th')[{column}].querySelector('button')"
                     f".click()")
    order = browser.evaluate(f"{ROWS}.map(r => r.cells[0].textContent)")
    return order, browser.evaluate(f"document.querySelectorAll('#districts-table thead th')[{column}]"
                                   f".getAttribute('aria-sort')")


def _sorted(rows: list[dict], key: str, descending: bool) -> list[str]:
    """District order the table should show: by value, missing values last either way, ties in table order."""
    present = [r for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    ordered = sorted(present, key=lambda r: r[key], reverse=descending)
    return [r["district"] for r in ordered] + [r["district"] for r in rows if r not in present]


def test_report_page_in_a_headless_browser(tmp_path, chromium):
    runs = [make_run(tmp_path / f"seed-{k}", districts(0.05 * k, **{NAMES[1]: {"personalised": None}}))
            for k in range(2)]
    comparison = make_study_report(runs, tmp_path / "report")
    rows = comparison.rows
    with HeadlessChromium(chromium, tmp_path / "profile", width=1280, height=900) as browser:
        browser.open((tmp_path / "report" / "report.html").as_uri())
        assert browser.evaluate(f"{ROWS}.length") == len(rows) == 4
        assert browser.evaluate(f"{ROWS}.map(r => r.cells[0].textContent)") == NAMES
        assert browser.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
                                ".length") == len(comparison.summary["figures"]) == 4
        assert _click(browser, "samples") == (_sorted(rows, "samples", False), "ascending")
        assert _click(browser, "samples") == (_sorted(rows, "samples", True), "descending")
        # a district without a personalised result ("-") stays last in both directions
        assert _click(browser, "F1 personalised") == (_sorted(rows, "f1_personalised", False), "ascending")
        assert _click(browser, "F1 personalised")[0] == _sorted(rows, "f1_personalised", True)
        assert _click(browser, "F1 personalised")[0][-1] == NAMES[1]
        assert _click(browser, "gain % federated")[0] == _sorted(rows, "gain_pct", False)
        assert _click(browser, "district")[0] == sorted(NAMES)
        screenshot = browser.screenshot(tmp_path / "report.png", full_page=True)
        assert browser.errors == []
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
