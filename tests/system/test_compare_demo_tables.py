"""tests/system/compare_demo_tables.sh: identical tables pass, any byte difference or missing file fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).with_name("compare_demo_tables.sh")


def make_clone(root: Path, files: dict[str, bytes]) -> Path:
    tables = root / "results" / "tables"
    tables.mkdir(parents=True)
    for name, content in files.items():
        (tables / name).write_bytes(content)
    return root


def compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=60)


TABLES = {"main_results.csv": b"detector,AP\nretina_unet,0.125\n", "main_results.md": b"| a |\n|---|\n| 1 |\n",
          "runs.csv": b"x\n1\n", "figure.png": b"not compared"}


def test_identical_clones(tmp_path):
    result = compare(make_clone(tmp_path / "a", TABLES), make_clone(tmp_path / "b", TABLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical: 3 table files" in result.stdout


def test_a_changed_number_is_reported_with_its_diff(tmp_path):
    changed = {**TABLES, "main_results.csv": b"detector,AP\nretina_unet,0.126\n", "figure.png": b"other"}
    result = compare(make_clone(tmp_path / "a", TABLES), make_clone(tmp_path / "b", changed))
    assert result.returncode == 1
    assert "differs: main_results.csv" in result.stdout
    assert "-retina_unet,0.125" in result.stdout and "+retina_unet,0.126" in result.stdout
    assert "figure.png" not in result.stdout and "main_results.md" not in result.stdout


def test_whitespace_only_and_missing_files_fail(tmp_path):
    crlf = {"main_results.csv": TABLES["main_results.csv"].replace(b"\n", b"\r\n"), "main_results.md": TABLES["main_results.md"],
            "extra.md": b"new\n"}
    result = compare(make_clone(tmp_path / "a", TABLES), make_clone(tmp_path / "b", crlf))
    assert result.returncode == 1
    assert "differ only in whitespace or line endings" in result.stdout
    assert "only in" in result.stdout and "runs.csv" in result.stdout and "extra.md" in result.stdout


def test_a_clone_without_tables_is_a_usage_error(tmp_path):
    result = compare(make_clone(tmp_path / "a", TABLES), tmp_path / "missing")
    assert result.returncode == 2 and "no results/tables folder" in result.stderr
