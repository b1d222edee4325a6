"""Unlabelled pre-training corpora from real sources: find the volumes, plan, preprocess in shards, gather.

Sources (``pretraining.corpus.source``):

- ``folders``: folders searched recursively for NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd`` with
  its data file), NRRD (``.nrrd``, ``.nhdr``) files and DICOM series (files named ``.dcm`` / ``.ima``, or any file
  with the ``DICM`` preamble; one volume per ``SeriesInstanceUID`` and folder);
- ``ct_rate``: a Hugging Face dataset repository (CT-RATE by default), fetched with ``huggingface_hub`` into its
  cache layout (``blobs/`` + ``snapshots/<commit>/``); resumable; ``HF_TOKEN`` for the gated repository,
  ``HF_HUB_OFFLINE=1`` to read the cache without network;
- ``datasets``: the ``imagesTr`` volumes of converted study datasets (every channel, labels unused; the held-out
  ``imagesTs`` never);
- ``synthetic``: the synthesized phantom folder, indexed like a folder.

Steps, one workflow rule each, so that tens of thousands of volumes preprocess in parallel jobs:

1. :func:`index_corpus` -> ``manifest.json``: every volume with its files, size and sha256 (a volume of several
   files hashes the concatenation of its files' sha256), and what changed since the previous index (a hidden
   ``.index_cache.json`` beside it keeps the digests; a file whose size and modification time are unchanged
   keeps its digest without being read again);
2. :func:`plan_corpus` -> ``plan.json``: each volume's geometry (from the header), the target spacing ('median',
   'none' or fixed) and the normalisation (nnssl's per-volume z-score, or the CT body statistics);
3. :func:`preprocess_corpus_shard` (shard ``i`` of ``N``: every ``N``-th volume from ``i``): normalise, then
   resample (nnssl's order), one ``cases/{id}.npy`` (float32 ``[1, Z, Y, X]``) per volume; resumable (finished
   volumes stay in ``.shard{i}.partial`` across a killed job);
4. :func:`gather_corpus` -> ``preprocessed_corpus/{corpus}/``: ``cases/`` (hard links to the shards' files),
   ``failures.json`` and ``plan.json`` (last), read by pre-training as before.

An unreadable volume is skipped and reported (id, path, step and reason in ``failures.json``); above
``max_failure_fraction`` of the volumes found the gather step fails and writes the report beside its output.

Example:
    >>> volumes = find_volumes(["/data/ct"])  # doctest: +SKIP
    >>> prepare_corpus({"source": "folders", "folders": ["/data/ct"]}, "out/corpus", {"target_spacing": [1, 1, 1]},
    ...                shards=2)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from pretrain_det3d.data.download import file_digest
from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import geometry_of, read_image
from pretrain_det3d.settings.data import CorpusEntry, CorpusPreprocessingSettings, CtRateSettings
from pretrain_det3d.utils.atomic import atomic_directory, atomic_path, write_json

LOGGER = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
SHARD_FILE = "shard.json"
FAILURES_FILE = "failures.json"
CASES_DIR = "cases"
INDEX_CACHE_FILE = ".index_cache.json"
CORPUS_PLAN_VERSION = 1
#: file name endings of the single-file formats SimpleITK reads (the longest ending is tried first)
VOLUME_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti", ".nii": "nifti", ".mha": "metaimage", ".mhd": "metaimage", ".nrrd": "nrrd", ".nhdr": "nrrd",
}
DICOM_SUFFIXES = (".dcm", ".ima")
DICOM_MAGIC_OFFSET = 128  # DICOM part 10: a 128-byte preamble, then "DICM"
REAL_SOURCES = ("folders", "ct_rate", "datasets")
DEFAULT_MAX_FAILURE_FRACTION = CorpusEntry.default("max_failure_fraction")


class CorpusFailureError(RuntimeError):
    """Too many volumes of a corpus could not be read (the report lists each with its reason)."""


# ---- finding volumes -------------------------------------------------------------------------------------
def volume_format(name: str) -> str | None:
    """The format of a single-file volume by its name, or None.

    Example:
        >>> volume_format("a/ct.NII.GZ"), volume_format("x.mhd"), volume_format("x.raw")
        ('nifti', 'metaimage', None)
    """
    lower = name.lower()
    for suffix, fmt in VOLUME_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    return None


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file by its name (.dcm, .ima) or by the part-10 preamble (many series have no file suffix)."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _metaimage_data_files(header: Path) -> list[Path]:
    """The data file(s) an ``.mhd`` header names (none for ``LOCAL`` data or a missing key)."""
    try:
        lines = header.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            value = value.strip()
            if value.upper() == "LOCAL" or not value:
                return []
            return [header.parent / value]  # file lists (LIST, patterns) are left to SimpleITK
    return []


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__").replace(os.sep, "__")).strip("_") or "volume"


def _assign_ids(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids from file names (without the format's ending) where unique, else from the relative path."""
    counts: dict[str, int] = {}
    for volume in volumes:
        counts[volume["stem"]] = counts.get(volume["stem"], 0) + 1
    used: set[str] = set()
    for volume in volumes:
        base = _sanitise(volume["stem"] if counts[volume["stem"]] == 1 else volume["relative"])
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate)
        volume["id"] = candidate
    return volumes


def find_volumes(roots: Sequence[str | os.PathLike], prefix: str | None = None) -> list[dict[str, Any]]:
    """Every volume below ``roots``: ``{"id", "format", "path", "files"}`` in a deterministic order.

    ``path`` is the image file (or the folder of a DICOM series), ``files`` every file whose bytes make the
    volume (an ``.mhd`` header and its data file; a series' slices in GDCM's order). Hidden files and folders
    (names starting with '.') are skipped. With several roots the relative paths start with the root's folder
    name; ``prefix`` starts every id (the dataset name of the 'datasets' source).

    Example:
        >>> [v["id"] for v in find_volumes(["corpus"])]  # doctest: +SKIP
        ['ct_0001', 'ct_0002', 'series_a']
    """
    found: list[dict[str, Any]] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise DatasetFormatError.for_file(root, "corpus source folder is missing")
        label = root.name if len(roots) > 1 else ""
        for folder, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            folder = Path(folder)
            rel_folder = folder.relative_to(root)
            dicom_candidates = []
            for name in sorted(n for n in names if not n.startswith(".")):
                path = folder / name
                fmt = volume_format(name)
                if fmt is None:
                    if _is_dicom_file(path):
                        dicom_candidates.append(path)
                    continue
                files = [path] + (_metaimage_data_files(path) if name.lower().endswith(".mhd") else [])
                relative = str(Path(label) / rel_folder / _stem(name))
                found.append({"format": fmt, "path": str(path), "files": [str(f) for f in files],
                              "stem": _stem(name), "relative": relative})
            if dicom_candidates:
                series_ids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
                for k, uid in enumerate(series_ids):
                    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                    stem = folder.name if len(series_ids) == 1 else f"{folder.name}_s{k}"
                    relative = str(Path(label) / rel_folder) + ("" if len(series_ids) == 1 else f"_s{k}")
                    found.append({"format": "dicom", "path": str(folder), "files": files, "series_uid": uid,
                                  "stem": stem, "relative": relative})
    volumes = _assign_ids(found)
    for volume in volumes:
        del volume["stem"], volume["relative"]
        if prefix:
            volume["id"] = f"{prefix}_{volume['id']}"
    return volumes


def dataset_volumes(converted: Mapping[str, str | os.PathLike]) -> list[dict[str, Any]]:
    """The ``imagesTr`` volumes of converted datasets ``{name: root}``, ids ``{name}_{case}_{channel}``.

    Example:
        >>> [v["id"] for v in dataset_volumes({"luna16": "converted/luna16"})][:1]  # doctest: +SKIP
        ['luna16_1.3.6.1.4.1.14519.5.2.1.6279_0000']
    """
    volumes = []
    for name, root in converted.items():
        images = Path(root) / "imagesTr"
        if not images.is_dir():
            raise DatasetFormatError.for_file(images, f"dataset {name!r} has no imagesTr folder (not converted?)")
        volumes += find_volumes([images], prefix=name)
    return volumes


# ---- Hugging Face --------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_hf_files(settings: Mapping[str, Any], cache_dir: str | os.PathLike) -> tuple[Path, list[str]]:
    """Fetch a dataset repository's files matching ``include`` into the huggingface_hub cache ``cache_dir``.

    Returns ``(snapshot folder, selected paths relative to it)``. Online, the repository's file list is filtered
    with huggingface_hub's own pattern rule, sorted and cut to ``max_files``; the files are downloaded (resumed
    where a previous run stopped). With ``HF_HUB_OFFLINE=1`` nothing is requested: the cached snapshot of the
    revision is read (the same selection when the cache holds it whole). A gated repository needs its terms
    accepted and ``HF_TOKEN`` set.

    Example:
        >>> root, files = fetch_hf_files({"max_files": 10}, "data/raw/corpus_ct/huggingface")  # doctest: +SKIP
    """
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, filter_repo_objects

    options = CtRateSettings.parse(dict(settings), where="pretraining.corpus.ct_rate")
    cache_dir = Path(cache_dir)
    common = {"repo_id": options.repo_id, "repo_type": "dataset", "revision": options.revision,
              "cache_dir": str(cache_dir)}
    try:
        if _offline() or options.max_files is None:
            snapshot = Path(huggingface_hub.snapshot_download(
                **common, allow_patterns=list(options.include), local_files_only=_offline(),
                max_workers=options.num_workers))
            listed = sorted(str(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob("*") if p.is_file())
            selected = sorted(filter_repo_objects(listed, allow_patterns=list(options.include)))
        else:
            api = huggingface_hub.HfApi()
            names = api.list_repo_files(options.repo_id, repo_type="dataset", revision=options.revision)
            selected = sorted(filter_repo_objects(names, allow_patterns=list(options.include)))
            selected = selected[: options.max_files]
            download = functools.partial(huggingface_hub.hf_hub_download, **common)
            with ThreadPoolExecutor(max_workers=options.num_workers) as pool:
                paths = list(tqdm(pool.map(lambda name: download(filename=name), selected), total=len(selected),
                                  desc=f"download {options.repo_id}", unit="file"))
            snapshot = Path(paths[0]).parents[len(Path(selected[0]).parts) - 1] if paths else cache_dir
    except GatedRepoError as error:
        raise PermissionError(
            f"{options.repo_id} is gated: accept its terms at https://huggingface.co/datasets/{options.repo_id} "
            f"and set HF_TOKEN to a token of that account ({error.__class__.__name__})") from None
    if options.max_files is not None:
        selected = selected[: options.max_files]
    if not selected:
        raise DatasetFormatError.for_file(cache_dir, f"no file of {options.repo_id} (revision {options.revision}) "
                                          f"matches include {list(options.include)}")
    return snapshot, selected


def _hf_volumes(snapshot: Path, selected: Sequence[str]) -> list[dict[str, Any]]:
    volumes = []
    for name in selected:
        fmt = volume_format(name)
        if fmt is None:
            continue  # metadata files matched by a broad pattern
        path = snapshot / name
        files = [path] + (_metaimage_data_files(path) if name.lower().endswith(".mhd") else [])
        volumes.append({"format": fmt, "path": str(path), "files": [str(f) for f in files],
                        "stem": _stem(Path(name).name), "relative": _stem(name)})
    volumes = _assign_ids(volumes)
    for volume in volumes:
        del volume["stem"], volume["relative"]
    return volumes


# ---- index -------------------------------------------------------------------------------------------------
def _file_record(path: str, cache: Mapping[str, Any]) -> dict[str, Any]:
    stat = os.stat(path)
    known = cache.get(path)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return dict(known)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_digest(path)}


def _volume_digest(file_digests: Sequence[str]) -> str:
    if len(file_digests) == 1:
        return file_digests[0]
    return hashlib.sha256("".join(file_digests).encode("ascii")).hexdigest()


def source_volumes(source: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The volumes of a corpus source and what the manifest records about the source.

    ``source``: ``{"source": "folders" | "synthetic", "folders": [...]}``, ``{"source": "ct_rate", "ct_rate":
    {...}, "cache_dir": ...}`` or ``{"source": "datasets", "datasets": {name: converted root}}``.
    """
    kind = source.get("source")
    if kind in ("folders", "synthetic"):
        folders = [str(f) for f in source.get("folders") or []]
        if not folders:
            raise ValueError(f"corpus source {kind!r} needs 'folders'")
        return find_volumes(folders), {"folders": folders}
    if kind == "datasets":
        datasets = {str(k): str(v) for k, v in (source.get("datasets") or {}).items()}
        if not datasets:
            raise ValueError("corpus source 'datasets' needs 'datasets': {name: converted folder}")
        return dataset_volumes(datasets), {"datasets": datasets}
    if kind == "ct_rate":
        settings = dict(source.get("ct_rate") or {})
        cache_dir = source.get("cache_dir") or settings.get("cache_dir")
        if not cache_dir:
            raise ValueError("corpus source 'ct_rate' needs a cache_dir")
        settings.pop("cache_dir", None)
        snapshot, selected = fetch_hf_files(settings, cache_dir)
        options = CtRateSettings.parse(settings, where="pretraining.corpus.ct_rate")
        return _hf_volumes(snapshot, selected), {"repo_id": options.repo_id, "revision": options.revision,
                                                  "commit": snapshot.name, "snapshot": str(snapshot),
                                                  "include": list(options.include), "max_files": options.max_files}
    raise ValueError(f"unknown corpus source {kind!r}; known: synthetic, {', '.join(REAL_SOURCES)}")


def index_corpus(source: Mapping[str, Any], out_path: str | os.PathLike, name: str | None = None,
                 num_workers: int = 4) -> dict[str, Any]:
    """Find (or fetch) the volumes of ``source`` and write ``manifest.json`` with their size and sha256.

    Digests of unchanged files (same size and modification time) come from the hidden cache beside the
    manifest; ``changes`` lists the ids added, removed and changed since the previous index. A file that
    cannot be read is a failure of step 'index' (listed, not fatal here).

    Example:
        >>> index_corpus({"source": "folders", "folders": ["/data/ct"]}, "corpus_index/ct/manifest.json")  # doctest: +SKIP
    """
    out_path = Path(out_path)
    volumes, described = source_volumes(source)
    if not volumes:
        places = described.get("folders") or list(described.get("datasets", {}).values()) or [described.get("snapshot")]
        raise DatasetFormatError.for_file(", ".join(map(str, places)),
                                          "no volumes found (NIfTI, MHA/MHD, NRRD files or DICOM series)")
    cache_path = out_path.parent / INDEX_CACHE_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {"files": {}, "volumes": {}}
    files = sorted({f for v in volumes for f in v["files"]})

    def record(path: str) -> tuple[str, dict[str, Any] | str]:
        try:
            return path, _file_record(path, cache["files"])
        except OSError as error:
            return path, f"{error.__class__.__name__}: {error}"

    with ThreadPoolExecutor(max_workers=max(int(num_workers), 1)) as pool:
        records = dict(tqdm(pool.map(record, files), total=len(files), desc="sha256", unit="file"))
    entries, failures = [], []
    for volume in volumes:
        problems = [f"{f}: {records[f]}" for f in volume["files"] if isinstance(records[f], str)]
        if problems:
            failures.append({"id": volume["id"], "path": volume["path"], "step": "index", "reason": problems[0]})
            continue
        volume = dict(volume, size=sum(records[f]["size"] for f in volume["files"]),
                      sha256=_volume_digest([records[f]["sha256"] for f in volume["files"]]))
        entries.append(volume)
    previous = cache.get("volumes", {})
    current = {v["id"]: v["sha256"] for v in entries}
    changes = {"added": sorted(set(current) - set(previous)), "removed": sorted(set(previous) - set(current)),
               "changed": sorted(k for k in set(current) & set(previous) if current[k] != previous[k])}
    if previous:
        LOGGER.info("since the previous index: %d added, %d removed, %d changed", *map(len, changes.values()))
    manifest = {
        "version": CORPUS_PLAN_VERSION, "corpus": name or out_path.parent.name, "source": source.get("source"),
        **described, "num_found": len(volumes), "volumes": entries, "failures": failures, "changes": changes,
    }
    write_json(out_path, manifest)
    kept = {f: r for f, r in records.items() if not isinstance(r, str)}
    write_json(cache_path, {"files": kept, "volumes": current})
    LOGGER.info("%s: %d volumes (%d unreadable)", out_path, len(entries), len(failures))
    return manifest


# ---- reading and preprocessing one volume ------------------------------------------------------------------
def read_volume(entry: Mapping[str, Any]) -> sitk.Image:
    """The 3D image of a manifest entry (a file through :func:`~pretrain_det3d.data.io.read_image`, which checks
    truncation, or a DICOM series through GDCM); problems raise errors that name the file."""
    if entry["format"] != "dicom":
        return read_image(entry["path"])
    from pretrain_det3d.data.converters.dicom import DicomSeries, read_dicom_series

    series = DicomSeries(entry.get("series_uid", ""), Path(entry["path"]), tuple(Path(f) for f in entry["files"]))
    image, _ = read_dicom_series(series, tags=())
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetFormatError.for_file(entry["path"], "expected a single-component DICOM series")
    return image


def _header_geometry(entry: Mapping[str, Any]) -> tuple[list[float], list[int]]:
    """Spacing and shape (z, y, x) from the header alone (a DICOM series is read whole)."""
    if entry["format"] == "dicom":
        geometry = geometry_of(read_volume(entry))
        return list(geometry["spacing"]), list(geometry["size"])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(entry["path"]))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        detail = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DatasetFormatError.for_file(entry["path"], f"unreadable header ({detail[-1] if detail else error})")
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise DatasetFormatError.for_file(entry["path"], f"expected a 3D single-component image, got dimension "
                                          f"{reader.GetDimension()} with {reader.GetNumberOfComponents()} components")
    return [float(s) for s in reader.GetSpacing()[::-1]], [int(n) for n in reader.GetSize()[::-1]]


def _failure(entry: Mapping[str, Any], step: str, error: BaseException) -> dict[str, Any]:
    return {"id": entry["id"], "path": entry["path"], "step": step, "reason": f"{error.__class__.__name__}: {error}"}


def _inspect(entry: Mapping[str, Any], samples: bool, max_samples: int, seed: int) -> dict[str, Any]:
    """Geometry (and CT body samples) of one volume, or its failure; runs in a worker."""
    from pretrain_det3d.data.preprocessing import BODY_THRESHOLD_HU, _sample, case_rng

    try:
        if samples:
            image = read_volume(entry)
            geometry = geometry_of(image)
            values = sitk.GetArrayFromImage(image)
            body = _sample(values[values > BODY_THRESHOLD_HU], max_samples, case_rng(seed, entry["id"]))
            return {"spacing": list(geometry["spacing"]), "shape": list(geometry["size"]),
                    "samples": body.astype(np.float32)}
        spacing, shape = _header_geometry(entry)
        if min(spacing) <= 0:
            raise DatasetFormatError.for_file(entry["path"], f"spacing must be positive, got {spacing}")
        return {"spacing": spacing, "shape": shape}
    except Exception as error:  # noqa: BLE001 - any unreadable volume is skipped and reported
        return {"failure": _failure(entry, "plan", error)}


def resolve_normalisation(setting: str, source: str, modality: str) -> str:
    """'zscore' or 'ct_body' for a corpus's ``normalisation`` setting.

    Example:
        >>> resolve_normalisation("auto", "synthetic", "CT"), resolve_normalisation("auto", "folders", "CT")
        ('ct_body', 'zscore')
    """
    if setting != "auto":
        return setting
    if source in REAL_SOURCES:
        return "zscore"  # nnssl normalises every pre-training volume by its own mean and std
    from pretrain_det3d.data.preprocessing import is_ct

    return "ct_body" if is_ct(modality) else "zscore"


def preprocess_volume(image: sitk.Image, normalisation: Sequence[Mapping[str, Any]],
                      target_spacing: Sequence[float] | None) -> np.ndarray:
    """Normalise one volume, then resample it to ``target_spacing`` (None: kept), as nnssl's preprocessor orders
    the two; float32 ``[1, Z, Y, X]``; NaN becomes 0.

    Example:
        >>> preprocess_volume(sitk.GetImageFromArray(np.arange(8.0).reshape(2, 2, 2)), [{"scheme": "zscore"}],
        ...                   None).shape
        (1, 2, 2, 2)
    """
    from pretrain_det3d.data.preprocessing import normalise, resample_image, resampled_shape

    array = np.nan_to_num(sitk.GetArrayFromImage(image).astype(np.float32), nan=0.0)[None]
    out = normalise(array, normalisation)
    if target_spacing is None:
        return out
    new_shape = resampled_shape(out.shape[1:], geometry_of(image)["spacing"], target_spacing)
    return resample_image(out, new_shape)


# ---- plan --------------------------------------------------------------------------------------------------
def _target_spacing(setting: Any, spacings: Sequence[Sequence[float]]) -> list[float] | None:
    from pretrain_det3d.data.preprocessing import median_spacing

    if setting is None or setting == "median":
        return [float(s) for s in median_spacing(spacings)]
    if setting == "none":
        return None
    return [float(s) for s in setting]


def plan_corpus(manifest_path: str | os.PathLike, out_path: str | os.PathLike,
                settings: Mapping[str, Any]) -> dict[str, Any]:
    """Plan the preprocessing of an indexed corpus: target spacing, normalisation, the readable volumes.

    Headers are enough for a z-scored corpus; the ``ct_body`` scheme reads every volume for its body samples.
    Volumes whose header cannot be read are failures of step 'plan'.

    Example:
        >>> plan_corpus("corpus_index/ct/manifest.json", "corpus_index/ct/plan.json", {"target_spacing": "none"})  # doctest: +SKIP
    """
    from pretrain_det3d.data.preprocessing import BODY_THRESHOLD_HU, _map_with_progress, ct_normalisation

    manifest = json.loads(Path(manifest_path).read_text())
    options = CorpusPreprocessingSettings.parse(dict(settings), where="pretraining.corpus.preprocessing")
    scheme = resolve_normalisation(options.normalisation, manifest["source"], options.modality)
    inspect = functools.partial(_inspect, samples=scheme == "ct_body",
                                max_samples=options.foreground_intensity_samples, seed=options.seed)
    results = _map_with_progress(inspect, manifest["volumes"], options.num_workers, desc="plan corpus")
    failures = list(manifest.get("failures", []))
    volumes, pooled = [], []
    for entry, result in zip(manifest["volumes"], results):
        if "failure" in result:
            failures.append(result["failure"])
            continue
        volumes.append({**entry, "spacing": result["spacing"], "shape": result["shape"]})
        if "samples" in result:
            pooled.append(result["samples"])
    if not volumes:
        raise DatasetFormatError.for_file(manifest_path, "no readable volume in the corpus" + (
            f" ({len(failures)} unreadable; first: {failures[0]['path']}: {failures[0]['reason']})" if failures else ""))
    spacings = [v["spacing"] for v in volumes]
    if scheme == "ct_body":
        body = np.concatenate(pooled) if pooled else np.zeros(0, np.float32)
        if body.size == 0:
            raise DatasetFormatError.for_file(manifest_path, f"no voxel above {BODY_THRESHOLD_HU} HU in any CT volume")
        normalisation = [ct_normalisation(body)]
    else:
        normalisation = [{"scheme": "zscore"}]
    from pretrain_det3d.data.preprocessing import median_spacing

    plan = {
        "version": CORPUS_PLAN_VERSION,
        "corpus": manifest["corpus"],
        "source": manifest["source"],
        "manifest_sha256": file_digest(manifest_path),
        "target_spacing": _target_spacing(options.target_spacing, spacings),
        "original_median_spacing": [float(s) for s in median_spacing(spacings)],
        "modalities": [options.modality],
        "normalisation": normalisation,
        "num_found": int(manifest["num_found"]),
        "volumes": volumes,
        "failures": failures,
    }
    write_json(out_path, plan)
    LOGGER.info("%s: %d volumes planned, %d failed", out_path, len(volumes), len(failures))
    return plan


# ---- shards ------------------------------------------------------------------------------------------------
def shard_volumes(volumes: Sequence[Any], shard: int, num_shards: int) -> list[Any]:
    """Shard ``shard`` of ``num_shards``: every ``num_shards``-th volume from ``shard`` (mixes sizes and sources).

    Example:
        >>> shard_volumes(list("abcdefg"), 1, 3)
        ['b', 'e']
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
    return list(volumes[shard::num_shards])


def _preprocess_entry(entry: Mapping[str, Any], work: str, normalisation: Sequence[Mapping[str, Any]],
                      target_spacing: Sequence[float] | None) -> dict[str, Any]:
    """Preprocess one volume into ``work/cases``; its record (shape or failure) goes to ``work/done``."""
    work_dir = Path(work)
    try:
        array = preprocess_volume(read_volume(entry), normalisation, target_spacing)
        with atomic_path(work_dir / CASES_DIR / f"{entry['id']}.npy") as tmp:
            np.save(tmp, array)
        record = {"id": entry["id"], "shape": [int(n) for n in array.shape[1:]]}
    except Exception as error:  # noqa: BLE001 - any unreadable volume is skipped and reported
        LOGGER.warning("skipped %s: %s", entry["path"], error)
        record = {"id": entry["id"], "failure": _failure(entry, "preprocess", error)}
    write_json(work_dir / "done" / f"{entry['id']}.json", record)  # last: the volume is finished
    return record


def preprocess_corpus_shard(plan_path: str | os.PathLike, out_dir: str | os.PathLike, shard: int, num_shards: int,
                            num_workers: int = 1) -> dict[str, Any]:
    """Preprocess shard ``shard`` of ``num_shards`` of a planned corpus into ``out_dir`` (``cases/`` and
    ``shard.json`` with each volume's shape and the failures).

    The volumes are written one by one into ``.{out_dir name}.partial`` beside it; a rerun after a killed job
    keeps the finished ones (the folder is discarded when the plan changed) and the folder becomes ``out_dir``
    when all are done.

    Example:
        >>> preprocess_corpus_shard("corpus_index/ct/plan.json", "corpus_shards/ct/shard0", 0, 4)  # doctest: +SKIP
    """
    from pretrain_det3d.data.preprocessing import _map_with_progress

    plan_path, out_dir = Path(plan_path), Path(out_dir)
    plan = json.loads(plan_path.read_text())
    key = {"plan_sha256": file_digest(plan_path), "shard": int(shard), "num_shards": int(num_shards)}
    work = out_dir.parent / f".{out_dir.name}.partial"
    key_file = work / "key.json"
    if work.exists() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        write_json(key_file, key)
    (work / CASES_DIR).mkdir(exist_ok=True)
    volumes = shard_volumes(plan["volumes"], shard, num_shards)
    done = {p.stem for p in (work / "done").glob("*.json")} if (work / "done").is_dir() else set()
    todo = [v for v in volumes if v["id"] not in done]
    if done:
        LOGGER.info("%s: %d of %d volumes already done, resuming", work, len(volumes) - len(todo), len(volumes))
    _map_with_progress(
        functools.partial(_preprocess_entry, work=str(work), normalisation=plan["normalisation"],
                          target_spacing=plan["target_spacing"]),
        todo, num_workers, desc=f"preprocess corpus shard {shard}/{num_shards}",
    )
    records = [json.loads((work / "done" / f"{v['id']}.json").read_text()) for v in volumes]
    summary = {**key, "shapes": {r["id"]: r["shape"] for r in records if "shape" in r},
               "failures": [r["failure"] for r in records if "failure" in r]}
    write_json(work / SHARD_FILE, summary)
    shutil.rmtree(work / "done")
    key_file.unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    LOGGER.info("%s: %d volumes, %d failed", out_dir, len(summary["shapes"]), len(summary["failures"]))
    return summary


# ---- gather ------------------------------------------------------------------------------------------------
def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no second copy of a large corpus on the same file system
    except OSError:
        shutil.copy2(source, target)


def gather_corpus(plan_path: str | os.PathLike, shard_dirs: Iterable[str | os.PathLike], out_root: str | os.PathLike,
                  max_failure_fraction: float = DEFAULT_MAX_FAILURE_FRACTION) -> dict[str, Any]:
    """Join the shards into the preprocessed corpus ``out_root`` (``cases/``, ``failures.json``, ``plan.json``).

    Fails (:class:`CorpusFailureError`, the report written to ``{out_root}.failures.json``) when more than
    ``max_failure_fraction`` of the volumes found failed, or none succeeded.

    Example:
        >>> gather_corpus("corpus_index/ct/plan.json", ["corpus_shards/ct/shard0"], "preprocessed_corpus/ct")  # doctest: +SKIP
    """
    plan_path, out_root = Path(plan_path), Path(out_root)
    plan = json.loads(plan_path.read_text())
    plan_sha = file_digest(plan_path)
    shards = [(Path(d), json.loads((Path(d) / SHARD_FILE).read_text())) for d in shard_dirs]
    shapes: dict[str, list[int]] = {}
    failures = list(plan.get("failures", []))
    origin: dict[str, Path] = {}
    for folder, summary in shards:
        if summary["plan_sha256"] != plan_sha:
            raise ValueError(f"{folder}: preprocessed with another plan than {plan_path}; rerun its shard")
        for case, shape in summary["shapes"].items():
            shapes[case] = shape
            origin[case] = folder / CASES_DIR / f"{case}.npy"
        failures += summary["failures"]
    failed_ids = {f["id"] for f in failures}
    missing = [v["id"] for v in plan["volumes"] if v["id"] not in shapes and v["id"] not in failed_ids]
    if missing:
        raise ValueError(f"{plan_path}: {len(missing)} planned volumes are in no shard (first: {missing[0]}); "
                         f"were all {shards[0][1]['num_shards'] if shards else '?'} shards given?")
    total = int(plan["num_found"])
    fraction = len(failures) / total if total else 1.0
    report = {"corpus": plan["corpus"], "num_found": total, "num_failed": len(failures),
              "failure_fraction": fraction, "max_failure_fraction": float(max_failure_fraction),
              "failures": failures}
    if fraction > max_failure_fraction or not shapes:
        report_path = out_root.parent / f"{out_root.name}.{FAILURES_FILE}"
        write_json(report_path, report)
        listed = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:5])
        raise CorpusFailureError(
            f"{len(failures)} of {total} volumes of corpus {plan['corpus']!r} could not be read ({fraction:.1%}, "
            f"more than max_failure_fraction {max_failure_fraction:.1%}); every failure with its reason: "
            f"{report_path}. First: {listed}")
    case_ids = [v["id"] for v in plan["volumes"] if v["id"] in shapes]
    with atomic_directory(out_root) as tmp:
        (tmp / CASES_DIR).mkdir()
        for case in tqdm(case_ids, desc=f"gather corpus {plan['corpus']}", unit="case"):
            _link_or_copy(origin[case], tmp / CASES_DIR / f"{case}.npy")
        write_json(tmp / FAILURES_FILE, report)
        final = {
            "corpus": plan["corpus"],
            "source": plan["source"],
            "target_spacing": plan["target_spacing"],
            "original_median_spacing": plan["original_median_spacing"],
            "modalities": plan["modalities"],
            "normalisation": plan["normalisation"],
            "case_ids": case_ids,
            "shapes": {case: shapes[case] for case in case_ids},
            "median_shape": [int(v) for v in np.rint(np.median([shapes[c] for c in case_ids], axis=0))],
            "num_cases": len(case_ids),
            "num_failed": len(failures),
        }
        write_json(tmp / PLAN_FILE, final)  # last: its presence marks a finished corpus
    if failures:
        LOGGER.warning("%s: %d of %d volumes skipped (listed in %s)", out_root, len(failures), total, FAILURES_FILE)
    return final


# ---- the whole pipeline in one process -----------------------------------------------------------------------
def prepare_corpus(source: Mapping[str, Any], out_root: str | os.PathLike, settings: Mapping[str, Any],
                   shards: int = 1, max_failure_fraction: float = DEFAULT_MAX_FAILURE_FRACTION,
                   work_dir: str | os.PathLike | None = None, name: str | None = None) -> dict[str, Any]:
    """Index, plan, preprocess (``shards`` shards, one after the other) and gather a corpus in this process:
    what the workflow's four rules do, for a corpus prepared by hand and for tests.

    Example:
        >>> prepare_corpus({"source": "folders", "folders": ["/data/ct"]}, "preprocessed_corpus/ct", {})  # doctest: +SKIP
    """
    out_root = Path(out_root)
    work = Path(work_dir) if work_dir is not None else out_root.parent / f".{out_root.name}.work"
    num_workers = CorpusPreprocessingSettings.parse(dict(settings), where="preprocessing").num_workers
    try:
        index_corpus(source, work / MANIFEST_FILE, name=name or out_root.name)
        plan_corpus(work / MANIFEST_FILE, work / PLAN_FILE, settings)
        shard_dirs = [work / f"shard{i}" for i in range(shards)]
        for i, folder in enumerate(shard_dirs):
            preprocess_corpus_shard(work / PLAN_FILE, folder, i, shards, num_workers)
        return gather_corpus(work / PLAN_FILE, shard_dirs, out_root, max_failure_fraction)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
