"""Staging to node-local storage copies exactly the requested cases and removes them afterwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain_det3d.training.staging import staged_cases


@pytest.fixture
def preprocessed(tmp_path):
    root = tmp_path / "shared" / "ds"
    (root / "cases").mkdir(parents=True)
    (root / "plan.json").write_text(json.dumps({"num_classes": 1}))
    (root / "splits.json").write_text("[]")
    for case in ("a", "b", "c"):
        np.save(root / "cases" / f"{case}.npy", np.full((1, 2, 2, 2), ord(case), dtype=np.float32))
        np.save(root / "cases" / f"{case}_seg.npy", np.zeros((2, 2, 2), dtype=np.int16))
        (root / "cases" / f"{case}.json").write_text(json.dumps({"case": case}))
    return root


def test_copies_only_the_requested_cases_and_cleans_up(preprocessed, tmp_path, monkeypatch):
    local = tmp_path / "node_local"
    monkeypatch.setenv("TMPDIR", str(local))
    with staged_cases(preprocessed, ["a", "c"]) as staged:
        assert staged.parent == local
        assert sorted(p.name for p in (staged / "cases").iterdir()) == [
            "a.json", "a.npy", "a_seg.npy", "c.json", "c.npy", "c_seg.npy"]
        assert np.array_equal(np.load(staged / "cases" / "c.npy"), np.load(preprocessed / "cases" / "c.npy"))
        assert (staged / "plan.json").read_text() == (preprocessed / "plan.json").read_text()
    assert list(local.iterdir()) == []


def test_cleans_up_after_a_failure(preprocessed, tmp_path):
    with pytest.raises(RuntimeError):
        with staged_cases(preprocessed, ["b"], stage_dir=tmp_path / "stage"):
            raise RuntimeError("job killed")
    assert list((tmp_path / "stage").iterdir()) == []
