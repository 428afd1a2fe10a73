"""UPSTREAM.md's and the docs page's figure tables say what the committed JSON says.

``scripts/upstream_summary.py --check`` regenerates every generated region from its
JSON and fails on a difference; the tests below also make sure there is something
to check: each table is in UPSTREAM.md with rows, and a changed figure or a changed
result is caught.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/upstream_summary.py"
spec = importlib.util.spec_from_file_location("upstream_summary", SCRIPT)
summary = sys.modules["upstream_summary"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)


def test_generated_tables_match_the_json():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("table", summary.TABLES, ids=lambda table: table.name)
def test_every_table_is_in_upstream_md_with_rows(table):
    text = (REPO / "UPSTREAM.md").read_text()
    region = re.search(
        rf"<!-- generated:{table.name} -->\n(.*?)<!-- /generated:{table.name} -->", text, re.S
    )
    assert region, f"UPSTREAM.md has no region for {table.name}"
    rows = table.rows(json.loads((REPO / table.source).read_text()))
    assert rows and all(len(row) == len(table.columns.split(" | ")) for row in rows)
    lines = region.group(1).splitlines()
    assert sum(line.startswith("| ") for line in lines) == len(rows) + 1  # header and rows


def test_a_changed_figure_in_the_text_is_caught():
    text = (REPO / "UPSTREAM.md").read_text()
    assert summary.regenerate(text, "UPSTREAM.md") == text
    edited = text.replace("| 128 | 8K | no | ", "| 128 | 8K | no | 1", 1)
    assert edited != text
    assert summary.regenerate(edited, "UPSTREAM.md") == text


def test_a_changed_result_changes_the_table():
    table = next(table for table in summary.TABLES if table.name == "prefill_h200")
    data = json.loads((REPO / table.source).read_text())
    before = table.rows(data)
    for row in data["rows"]:
        if row["impl"] == "sdpa_cudnn":
            row["tops"] *= 2
    assert table.rows(data) != before
