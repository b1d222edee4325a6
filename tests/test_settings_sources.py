"""Every value the paper configurations set has a row in docs/settings.md that names its source.

The matching rule is the one stated at the top of docs/settings.md ("Which rows cover a config key"):

- each config file is flattened to dotted keys; a mapping is descended into, anything else (a number, a string,
  null, a list, also a list of mappings such as ``sources.luna16.files``) is one leaf at its key;
- a row is a Markdown table row whose first cell names key patterns in backticks (several per cell allowed,
  e.g. ``detectors.<name>.lr`` and ``detectors.<name>.weight_decay``); a pattern covers a key when they have the same
  number of dot-separated parts and each part is equal, or the pattern's part is a placeholder in angle brackets
  (``<name>``: any one part); a last part ``*`` covers any one or more parts (a whole subtree);
- the row must name a source: its third cell is not empty and not just a dash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest
import yaml

from conftest import REPO

SETTINGS_PAGE = REPO / "docs" / "settings.md"
PAPER_CONFIGS = [REPO / "config" / "paper.yaml", REPO / "config" / "paper_pretrain.yaml"]

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_]+$|^<[^<>]+>$|^\*$")


def flatten(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of every leaf of ``config`` (lists are leaves).

    Example:
        >>> flatten({"a": {"b": 1, "c": [1, {"d": 2}]}, "e": None})
        ['a.b', 'a.c', 'e']
    """
    keys: list[str] = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            keys.extend(flatten(value, prefix=f"{key}."))
        else:
            keys.append(key)
    return keys


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def sourced_patterns(markdown: str) -> list[tuple[str, ...]]:
    """Key patterns (split into parts) of every table row of ``markdown`` that names a source.

    Example:
        >>> sourced_patterns("| key | default | source |\\n|---|---|---|\\n| `a.<n>.b`, `c` | 1 | paper |\\n"
        ...                  "| `d.e` | 2 | — |")
        [('a', '<n>', 'b'), ('c',)]
    """
    patterns: list[tuple[str, ...]] = []
    for line in markdown.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3 or set(cells[0]) <= set("-: "):
            continue
        source = cells[2].strip()
        if not source or source.strip("-—– ") == "":
            continue
        for span in re.findall(r"`([^`]+)`", cells[0]):
            parts = tuple(span.strip().split("."))
            if all(_KEY_PATTERN.match(part) for part in parts):
                patterns.append(parts)
    return patterns


def covers(pattern: tuple[str, ...], key: str) -> bool:
    """Whether key pattern ``pattern`` (see the module docstring) covers dotted ``key``.

    Example:
        >>> covers(("detectors", "<name>", "lr"), "detectors.retina_unet.lr")
        True
        >>> covers(("sources", "<name>", "*"), "sources.lidc.path"), covers(("a", "b"), "a.b.c")
        (True, False)
    """
    parts = key.split(".")
    if pattern and pattern[-1] == "*":
        head = pattern[:-1]
        if len(parts) <= len(head):
            return False
        parts = parts[:len(head)]
        pattern = head
    if len(parts) != len(pattern):
        return False
    return all(p == k or (p.startswith("<") and p.endswith(">")) for p, k in zip(pattern, parts))


def keys_without_row(keys: Iterable[str], patterns: list[tuple[str, ...]]) -> list[str]:
    """The keys no pattern covers, in their order."""
    return [key for key in keys if not any(covers(pattern, key) for pattern in patterns)]


def paper_config_keys() -> list[str]:
    keys: list[str] = []
    for path in PAPER_CONFIGS:
        for key in flatten(yaml.safe_load(path.read_text(encoding="utf-8"))):
            if key not in keys:
                keys.append(key)
    return keys


def test_every_paper_config_value_has_a_sourced_row():
    patterns = sourced_patterns(SETTINGS_PAGE.read_text(encoding="utf-8"))
    missing = keys_without_row(paper_config_keys(), patterns)
    assert not missing, ("config keys of config/paper.yaml / config/paper_pretrain.yaml without a sourced row in "
                         "docs/settings.md: " + ", ".join(missing))


def test_a_key_without_a_row_is_reported():
    patterns = sourced_patterns(SETTINGS_PAGE.read_text(encoding="utf-8"))
    keys = paper_config_keys()
    fake = ["detectors.retina_unet.not_a_real_setting", "pretraining.methods.mae.invented_knob"]
    assert keys_without_row(keys + fake, patterns) == fake


@pytest.mark.parametrize(
    "row, key, covered",
    [
        ("| `study.folds` | [0..4] | paper |", "study.folds", True),
        ("| `study.folds` | [0..4] | — |", "study.folds", False),  # no source
        ("| `study.folds` | [0..4] | |", "study.folds", False),  # no source
        ("| `detectors.<name>.lr` | 0.01 | release |", "detectors.voco.lr", True),
        ("| `detectors.<name>.lr` | 0.01 | release |", "detectors.voco.lr.extra", False),
        ("| `sources.<name>.*` | urls | publisher |", "sources.lidc.files", True),
        ("| `sources.<name>.*` | urls | publisher |", "sources.lidc", False),
        ("| `a.b`, `c.d` | 1 | own choice: reason |", "c.d", True),
        ("| study.folds | [0..4] | paper |", "study.folds", False),  # patterns must be in backticks
        ("| `batch_size` (paper config) | 4 | release |", "detectors.retina_unet.batch_size", False),  # full keys
    ],
)
def test_the_matching_rule(row, key, covered):
    page = "| key | default | source | note |\n|---|---|---|---|\n" + row + "\n"
    assert (not keys_without_row([key], sourced_patterns(page))) is covered


def test_flatten_keeps_lists_and_empty_mappings_as_leaves(tmp_path: Path):
    config = {"sources": {"x": {"files": [{"url": "u"}], "path": None}}, "pretraining": {"methods": {}}}
    assert flatten(config) == ["sources.x.files", "sources.x.path", "pretraining.methods"]
