"""Synthetic phantoms: valid converted format, lesion properties, determinism, atomic writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pretrain_det3d.data import synthetic
from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case
from pretrain_det3d.data.synthetic import make_phantom, write_synthetic_corpus, write_synthetic_dataset

SETTINGS = {"num_cases": 6, "shape": [40, 48, 44], "spacing": [2.5, 0.8, 0.7], "num_classes": 2}
AIR_HU = -1000.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "demo"
    write_synthetic_dataset(root, "demo", SETTINGS, seed=7)
    return root


def test_written_dataset_passes_the_format_check(dataset: Path) -> None:
    summary = check_converted_dataset(dataset)
    assert summary.case_ids == [f"demo_{i:04d}" for i in range(6)]
    assert summary.modalities == ["CT"]
    assert summary.class_names == ["hyperdense_lesion", "hypodense_lesion"]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["num_cases"] == 6 and meta["name"] == "demo" and meta["licence"] and meta["source"]
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_geometry_is_the_requested_spacing_with_a_nontrivial_origin(dataset: Path) -> None:
    image = sitk.ReadImage(str(dataset / "imagesTr" / "demo_0000_0000.nii.gz"))
    assert image.GetSize() == tuple(SETTINGS["shape"][::-1])
    assert image.GetSpacing() == pytest.approx(SETTINGS["spacing"][::-1])
    assert np.linalg.norm(image.GetOrigin()) > 1.0  # not the default origin
    origins = {sitk.ReadImage(str(p)).GetOrigin() for p in (dataset / "imagesTr").glob("*.nii.gz")}
    assert len(origins) == 6  # drawn per case


def test_intensities_look_like_ct(dataset: Path) -> None:
    image = read_case(dataset, "demo_0001").image[0]
    corner = image[:3, :3, :3]
    assert abs(corner.mean() - AIR_HU) < 30  # air outside the body
    values = image.ravel()
    assert np.mean(values < -700) > 0.1  # air and lungs
    assert np.mean((values > -150) & (values < 120)) > 0.1  # soft tissue and liver
    assert np.any(values > 300)  # bone


def _lesion_records(root: Path, num_cases: int) -> list[dict]:
    records = []
    for index in range(num_cases):
        case = read_case(root, f"{root.name}_{index:04d}")
        image, seg = case.image[0], case.instance_map
        for instance_id, class_index in case.instances.items():
            mask = seg == instance_id
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            # 26-connected neighbourhood: another id there means two lesions touch
            neighbours = seg[ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))]
            records.append(
                {
                    "class": class_index,
                    "components": ndimage.label(mask)[1],
                    "touches_other": bool(np.any((neighbours != 0) & (neighbours != instance_id))),
                    "contrast": float(image[mask].mean() - image[ring].mean()),
                    "ring_mean": float(image[ring].mean()),
                    "box": instance_voxel_extents(mask.astype(np.int16))[1][0],
                }
            )
    return records


def test_lesions_are_separate_inside_the_body_and_of_the_requested_size(tmp_path: Path) -> None:
    settings = {**SETTINGS, "num_cases": 12, "lesions_per_case": [2, 4], "lesion_diameter": [3, 12]}
    root = tmp_path / "lesions"
    write_synthetic_dataset(root, "lesions", settings, seed=1)
    counts = [check_converted_dataset(root).num_instances[c] for c in check_converted_dataset(root).case_ids]
    assert all(2 <= n <= 4 for n in counts) and len(set(counts)) > 1
    records = _lesion_records(root, 12)
    assert all(r["components"] == 1 for r in records)
    assert not any(r["touches_other"] for r in records)
    assert all(r["ring_mean"] > -950 for r in records), "lesions must sit inside the body, not in air"
    extents = np.array([r["box"][3:] - r["box"][:3] for r in records])
    assert extents.min() >= 2 and extents.max() <= 12 + 1
    assert extents.max(axis=1).max() >= 8, "diameters should spread over the requested range"


def test_two_classes_differ_in_contrast_sign_and_contrast_varies(dataset: Path) -> None:
    records = _lesion_records(dataset, 6)
    by_class = {c: [r["contrast"] for r in records if r["class"] == c] for c in (0, 1)}
    assert by_class[0] and by_class[1]
    # relative to a 2-voxel ring around it (which may touch other compartments) nearly every lesion shows its sign
    assert np.mean([c > 0 for c in by_class[0]]) >= 0.8
    assert np.mean([c < 0 for c in by_class[1]]) >= 0.8
    assert np.std(np.abs(by_class[0] + by_class[1])) > 10  # contrast varies per lesion


def test_phantom_contrast_sign_follows_class() -> None:
    settings = {**SETTINGS, "lesions_per_case": [4, 4]}
    for num_classes in (1, 2):
        signs = {0: set(), 1: set()}
        for seed in range(6):
            phantom = make_phantom({**settings, "num_classes": num_classes}, np.random.default_rng(seed))
            for instance_id, class_index in phantom.instances.items():
                signs[class_index].add(np.sign(phantom.contrasts[instance_id]))
        if num_classes == 2:
            assert signs == {0: {1.0}, 1: {-1.0}}
        else:
            assert signs[0] == {1.0, -1.0} and not signs[1]  # one class: both hyper- and hypodense


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path: Path) -> None:
    settings = {**SETTINGS, "num_cases": 3}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic_dataset(tmp_path / name, "x", settings, seed=seed)
    a, b, c = (_arrays(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not np.array_equal(a["x_0000_0000.nii.gz"], c["x_0000_0000.nii.gz"])
    for json_file in (tmp_path / "a").rglob("*.json"):
        assert json_file.read_text() == (tmp_path / "b" / json_file.relative_to(tmp_path / "a")).read_text()


def test_a_case_does_not_depend_on_the_number_of_cases(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "two", "x", {**SETTINGS, "num_cases": 2}, seed=3)
    write_synthetic_dataset(tmp_path / "four", "x", {**SETTINGS, "num_cases": 4}, seed=3)
    two, four = _arrays(tmp_path / "two"), _arrays(tmp_path / "four")
    assert all(np.array_equal(two[k], four[k]) for k in two)


def test_corpus_is_unlabelled_deterministic_and_differs_from_the_dataset(tmp_path: Path, dataset: Path) -> None:
    settings = {"num_cases": 3, "shape": SETTINGS["shape"], "spacing": SETTINGS["spacing"]}
    write_synthetic_corpus(tmp_path / "corpus", settings, seed=7)
    write_synthetic_corpus(tmp_path / "again", {**settings, "name": "corpus"}, seed=7)
    files = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    assert files == [f"corpus_{i:04d}.nii.gz" for i in range(3)]
    first, again = _arrays(tmp_path / "corpus"), _arrays(tmp_path / "again")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    labelled = read_case(dataset, "demo_0000").image[0].astype(np.int16)
    assert not np.array_equal(first["corpus_0000.nii.gz"], labelled)  # a different seed stream
    image = sitk.ReadImage(str(tmp_path / "corpus" / "corpus_0000.nii.gz"))
    assert image.GetSpacing() == pytest.approx(SETTINGS["spacing"][::-1])


def test_failure_leaves_no_dataset_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_case", failing_write_case)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_dataset(tmp_path / "broken", "broken", SETTINGS, seed=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"shape": [40, 40]}, "shape"),
        ({"spacing": [1, 0, 1]}, "spacing"),
        ({"num_classes": 3}, "num_classes"),
        ({"lesions_per_case": [3, 1]}, "lesions_per_case"),
        ({"lesion_diameter": [1, 4]}, "lesion_diameter"),
        ({"num_cases": 0}, "num_cases"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"synthetic settings key '{key}'"):
        write_synthetic_dataset(tmp_path / "bad", "bad", {**SETTINGS, **change}, seed=0)
    assert not (tmp_path / "bad").exists()


def test_spacing_jitter_varies_spacing_per_case_within_bounds(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "jitter", "j", {**SETTINGS, "num_cases": 4, "spacing_jitter": 0.2}, seed=2)
    spacings = np.array(list(check_converted_dataset(tmp_path / "jitter").spacings.values()))
    assert len({tuple(s) for s in spacings}) == 4
    ratio = spacings / np.asarray(SETTINGS["spacing"])
    assert np.all((ratio >= 0.8) & (ratio <= 1.2))


def test_demo_size_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    settings = {"num_cases": 24, "shape": [64, 64, 64], "spacing": [1, 1, 1]}
    write_synthetic_dataset(tmp_path / "fast", "fast", settings, seed=0)
    assert time.perf_counter() - start < 15.0  # a few seconds on a laptop CPU; generous for a busy machine
