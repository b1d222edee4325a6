"""Pre-training corpora from real sources (data/corpus.py), with real-format files written here: a folder mixing
NIfTI, MHA, NRRD and a DICOM series; corrupt files; an offline Hugging Face cache in huggingface_hub's layout;
sharded against unsharded preprocessing; the DAG of a real source."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from conftest import SMOKE_CONFIG
from dicom_fixtures import write_dicom_series
from pretrain_det3d.data import corpus
from pretrain_det3d.settings.base import ConfigError
from pretrain_det3d.settings.data import CorpusEntry

RNG = np.random.default_rng(3)


def _write(path: Path, array: np.ndarray, spacing_zyx=(2.0, 1.0, 1.0), compress: bool = True) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return array


def _volume(shape=(6, 8, 7)) -> np.ndarray:
    return RNG.integers(-1000, 1000, size=shape).astype(np.int16)


def _sha256(*paths: Path) -> str:
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def _zscore(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    return (values - values.mean()) / values.std()


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """NIfTI (nested), MHA, NRRD and a 4-slice DICOM series (files without suffix), plus a text file."""
    root = tmp_path / "mixed"
    arrays = {
        "ct_a": _write(root / "site1" / "ct_a.nii.gz", _volume()),
        "ct_b": _write(root / "ct_b.mha", _volume((5, 6, 9)), (1.5, 0.8, 0.8)),
        "ct_c": _write(root / "site2" / "deep" / "ct_c.nrrd", _volume((4, 7, 7))),
    }
    dicom = _volume((4, 6, 5))
    write_dicom_series(root / "series_1", dicom, (0.7, 0.7, 2.5), (0, 0, 0), (1, 0, 0), (0, 1, 0),
                       series_uid="1.2.3.4", sop_uids=[f"1.2.3.4.{k}" for k in range(4)],
                       instance_numbers=[4, 3, 2, 1], file_names=[f"IM{k}.dcm" for k in (3, 1, 0, 2)])
    for path in (root / "series_1").iterdir():  # many real series have no file suffix: found by the preamble
        path.rename(path.with_suffix(""))
    arrays["series_1"] = dicom
    (root / "README.txt").write_text("not a volume")
    return root, arrays


def test_folder_of_mixed_formats_is_indexed_and_zscored(mixed_folder, tmp_path):
    root, arrays = mixed_folder
    manifest = corpus.index_corpus({"source": "folders", "folders": [str(root)]}, tmp_path / "index" / "manifest.json")
    by_id = {v["id"]: v for v in manifest["volumes"]}
    assert sorted(by_id) == sorted(arrays)
    assert {k: v["format"] for k, v in by_id.items()} == {"ct_a": "nifti", "ct_b": "metaimage", "ct_c": "nrrd",
                                                          "series_1": "dicom"}
    assert by_id["ct_a"]["sha256"] == _sha256(root / "site1" / "ct_a.nii.gz")
    assert by_id["ct_a"]["size"] == (root / "site1" / "ct_a.nii.gz").stat().st_size
    # the series' files in slice order (instance numbers were written reversed against the file names)
    assert [Path(f).name for f in by_id["series_1"]["files"]] == ["IM3", "IM1", "IM0", "IM2"]
    assert by_id["series_1"]["sha256"] == _sha256(*(root / "series_1" / n for n in ("IM3", "IM1", "IM0", "IM2")))
    assert manifest["failures"] == [] and manifest["num_found"] == 4

    out = tmp_path / "pre"
    plan = corpus.prepare_corpus({"source": "folders", "folders": [str(root)]}, out, {"target_spacing": "none"})
    assert plan["normalisation"] == [{"scheme": "zscore"}]  # a real source: nnssl's per-volume z-score
    assert plan["target_spacing"] is None and plan["num_failed"] == 0
    for case, array in arrays.items():
        stored = np.load(out / "cases" / f"{case}.npy")
        assert stored.shape == (1, *array.shape)
        np.testing.assert_allclose(stored[0], _zscore(array), rtol=1e-4, atol=1e-4)
    assert json.loads((out / "failures.json").read_text())["failures"] == []


def test_rerun_of_index_reports_changes(mixed_folder, tmp_path):
    root, _ = mixed_folder
    source = {"source": "folders", "folders": [str(root)]}
    target = tmp_path / "index" / "manifest.json"
    corpus.index_corpus(source, target)
    _write(root / "ct_b.mha", _volume((5, 6, 9)))  # new content
    (root / "site2" / "deep" / "ct_c.nrrd").unlink()
    _write(root / "new.nii.gz", _volume())
    manifest = corpus.index_corpus(source, target)
    assert manifest["changes"] == {"added": ["new"], "removed": ["ct_c"], "changed": ["ct_b"]}
    assert {v["id"]: v["sha256"] for v in manifest["volumes"]}["ct_b"] == _sha256(root / "ct_b.mha")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _folder_with_corrupt(root: Path, good: int, corrupt: int) -> None:
    for i in range(good):
        _write(root / f"good_{i}.nii.gz", _volume((3, 4, 5)))
    for i in range(corrupt):
        _write(root / f"bad_{i}.nii.gz", _volume((20, 20, 20)))
        _truncate(root / f"bad_{i}.nii.gz")


def test_corrupt_volume_is_skipped_and_reported(tmp_path):
    root = tmp_path / "folder"
    _folder_with_corrupt(root, good=3, corrupt=1)
    out = tmp_path / "pre"
    plan = corpus.prepare_corpus({"source": "folders", "folders": [str(root)]}, out, {},
                                 max_failure_fraction=0.25)  # 1 of 4: exactly at the limit passes
    assert plan["case_ids"] == ["good_0", "good_1", "good_2"] and plan["num_failed"] == 1
    report = json.loads((out / "failures.json").read_text())
    assert report["num_found"] == 4 and report["failure_fraction"] == pytest.approx(0.25)
    [failure] = report["failures"]
    assert failure["id"] == "bad_0" and failure["path"] == str(root / "bad_0.nii.gz")
    assert failure["step"] == "preprocess" and "truncated" in failure["reason"].lower()
    assert not (out / "cases" / "bad_0.npy").exists()


def test_failure_fraction_above_the_limit_fails_with_a_report(tmp_path):
    root = tmp_path / "folder"
    _folder_with_corrupt(root, good=3, corrupt=1)
    (root / "bad_header.mha").write_text("ObjectType = Image\nNDims = 3\nthis is not a header\n")  # unreadable
    out = tmp_path / "pre"
    with pytest.raises(corpus.CorpusFailureError, match=r"2 of 5 volumes"):
        corpus.prepare_corpus({"source": "folders", "folders": [str(root)]}, out, {}, max_failure_fraction=0.3)
    assert not out.exists()
    report = json.loads((tmp_path / "pre.failures.json").read_text())
    assert sorted(f["id"] for f in report["failures"]) == ["bad_0", "bad_header"]
    assert {f["id"]: f["step"] for f in report["failures"]}["bad_header"] == "plan"


def _hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> None:
    """The layout huggingface_hub writes: datasets--org--name/{refs/main, blobs/<sha256>, snapshots/<commit>/...}
    with each snapshot file a relative symlink to its blob."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_offline_hugging_face_cache_is_read_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the offline cache must be read without a request")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    staging = tmp_path / "staging"
    files = {}
    for name in ("dataset/train/train_1/train_1_a/train_1_a_1.nii.gz", "dataset/train/train_2/train_2_a/train_2_a_1.nii.gz",
                 "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz"):
        _write(staging / Path(name).name, _volume((3, 5, 4)))
        files[name] = (staging / Path(name).name).read_bytes()
    files["dataset/metadata/train_metadata.csv"] = b"VolumeName,Spacing\n"
    cache = tmp_path / "hf"
    _hf_cache(cache, "org/ct-rate", files)
    source = {"source": "ct_rate", "ct_rate": {"repo_id": "org/ct-rate"}, "cache_dir": str(cache)}
    manifest = corpus.index_corpus(source, tmp_path / "index" / "manifest.json")
    by_id = {v["id"]: v for v in manifest["volumes"]}
    assert sorted(by_id) == ["train_1_a_1", "train_2_a_1"]  # the default include: the training split only
    # the blob names are the sha256 huggingface_hub stores files under: an independent check of the digests
    for name in ("train_1_a_1", "train_2_a_1"):
        blob = Path(os.path.realpath(by_id[name]["path"])).name
        assert by_id[name]["sha256"] == blob
    assert manifest["commit"] == "a" * 40 and manifest["repo_id"] == "org/ct-rate"

    source["ct_rate"]["max_files"] = 1
    manifest = corpus.index_corpus(source, tmp_path / "index2" / "manifest.json")
    assert [v["id"] for v in manifest["volumes"]] == ["train_1_a_1"]  # the first by path


def test_sharded_preprocessing_equals_unsharded(tmp_path):
    root = tmp_path / "folder"
    for i in range(5):
        _write(root / f"v{i}.nii.gz", _volume((4 + i, 6, 5)), spacing_zyx=(1.0 + 0.5 * i, 1.0, 0.9))
    source = {"source": "folders", "folders": [str(root)]}
    settings = {"target_spacing": "median"}
    one = corpus.prepare_corpus(source, tmp_path / "one", settings, shards=1, name="c")
    three = corpus.prepare_corpus(source, tmp_path / "three", settings, shards=3, name="c",
                                  work_dir=tmp_path / "work3")
    assert one == three
    assert one["target_spacing"] == pytest.approx([2.0, 1.0, 0.9])  # the median, resampled to
    for case in one["case_ids"]:
        a, b = np.load(tmp_path / "one" / "cases" / f"{case}.npy"), np.load(tmp_path / "three" / "cases" / f"{case}.npy")
        assert a.tobytes() == b.tobytes()
    shard1 = json.loads((tmp_path / "work3" / "shard1" / "shard.json").read_text())
    assert sorted(shard1["shapes"]) == ["v1", "v4"]  # every third volume from the second


def test_shard_resumes_finished_volumes(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    for i in range(3):
        _write(root / f"v{i}.nii.gz", _volume((3, 4, 5)))
    work = tmp_path / "work"
    corpus.index_corpus({"source": "folders", "folders": [str(root)]}, work / "manifest.json")
    corpus.plan_corpus(work / "manifest.json", work / "plan.json", {})
    original = corpus.preprocess_volume
    calls = []

    def killed_after_first(image, normalisation, target_spacing):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the job is killed while the second volume is written
        return original(image, normalisation, target_spacing)

    monkeypatch.setattr(corpus, "preprocess_volume", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        corpus.preprocess_corpus_shard(work / "plan.json", work / "shard0", 0, 1)
    assert not (work / "shard0").exists() and (work / ".shard0.partial" / "cases" / "v0.npy").exists()
    calls.clear()
    monkeypatch.setattr(corpus, "preprocess_volume", lambda *a: (calls.append(1), original(*a))[1])
    summary = corpus.preprocess_corpus_shard(work / "plan.json", work / "shard0", 0, 1)
    assert len(calls) == 2 and sorted(summary["shapes"]) == ["v0", "v1", "v2"]  # v0 was not done again


def test_datasets_source_takes_training_images_only(tmp_path):
    converted = tmp_path / "converted" / "lesions"
    _write(converted / "imagesTr" / "case_000_0000.nii.gz", _volume((3, 4, 5)))
    _write(converted / "imagesTr" / "case_001_0000.nii.gz", _volume((3, 4, 5)))
    _write(converted / "imagesTs" / "case_900_0000.nii.gz", _volume((3, 4, 5)))
    _write(converted / "labelsTr" / "case_000.nii.gz", np.zeros((3, 4, 5), np.int16))
    manifest = corpus.index_corpus({"source": "datasets", "datasets": {"lesions": str(converted)}},
                                   tmp_path / "index" / "manifest.json")
    assert [v["id"] for v in manifest["volumes"]] == ["lesions_case_000_0000", "lesions_case_001_0000"]


def test_corpus_settings_name_the_missing_section():
    with pytest.raises(ConfigError, match="source 'folders' needs 'folders'"):
        CorpusEntry.parse({"name": "c", "source": "folders"}, where="pretraining.corpus")
    with pytest.raises(ConfigError, match="pretraining.corpus.max_failure_fraction"):
        CorpusEntry.parse({"name": "c", "source": "ct_rate", "max_failure_fraction": 2}, where="pretraining.corpus")
    entry = CorpusEntry.parse({"name": "c", "source": "ct_rate", "preprocessing": {"target_spacing": [1, 1, 1]}},
                              where="pretraining.corpus")
    assert entry.shards == 1 and entry.preprocessing.target_spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("source", ["folders", "datasets"])
def test_dry_run_schedules_sharded_corpus_from_a_real_source(tmp_path, snakemake_runner, source):
    from test_workflow_dag import job_counts

    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    entry = {"name": "real", "source": source, "shards": 3, "preprocessing": {"target_spacing": [1, 1, 1]}}
    if source == "folders":
        (tmp_path / "volumes").mkdir()
        entry["folders"] = [str(tmp_path / "volumes")]
    else:
        entry["datasets"] = ["smoke_lesions"]
    config["pretraining"]["corpus"] = entry
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake_runner(tmp_path, "-n", "results/data/preprocessed_corpus/real/plan.json", configfile=configfile)
    counts = job_counts(result.stdout)
    assert counts["index_corpus"] == counts["plan_corpus"] == counts["gather_corpus"] == 1
    assert counts["preprocess_corpus"] == 3 and "synthesize_corpus" not in counts
    assert counts.get("synthesize_dataset", 0) == (1 if source == "datasets" else 0)
