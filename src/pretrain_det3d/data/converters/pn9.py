"""PN9 (pulmonary nodules in CT, 9 classes): the publisher's preprocessed ``.npy`` volumes and box CSVs.

What is published (SANet repository ``mj129/SANet``, README and ``dataset/bbox_reader.py``, ``config.py``):
PN9 is distributed only after the publisher's own preprocessing (SANet paper, Sec. 5.2): every scan resampled
to 1 x 1 x 1 mm and its intensities mapped to [0, 255]. The ``.npy`` release (multi-part ``train.*`` /
``test.*`` tarballs) holds one array per scan, read by SANet as ``{pid}_zoom.npy`` with shape ``[1, D, H, W]``
(axes z, y, x). Annotations are CSV tables with one row per nodule::

    pid,nodule_class,xmin,xmax,ymin,ymax,zmin,zmax,nodule_id,center_x,center_y,center_z,diameter,x_size,y_size

``pid`` is the scan number without zero padding (file ``00805_zoom.npy`` <-> pid 805); ``xmin..zmax`` are voxel
indices of that 1 mm volume, *both ends inclusive* (single-slice nodules have ``zmin == zmax``, and SANet turns
a box into a size with ``max - min + 1``); ``x`` is the last array axis. SANet's config names the files
``split_full_with_nodule_9classes/{train,test}_anno.csv`` with case lists ``train.txt``, ``val.txt``,
``test.txt``. ``test_anno_center.csv`` (in the SANet repository) repeats the test rows with centres; it is not
read by default, as it would double the test nodules.

What this reading assumes and could not be checked here (the 227 GB release was not available): that the
``.npy`` files carry the ``_zoom`` suffix of SANet's reader (setting ``image_suffix`` otherwise) and that the
training annotations use the same columns as the published ``test_anno_center.csv``. The ``.jpg`` release
(one folder of slice images per scan) is not supported.

Conversion:

- image: the array as stored (values 0-255, *not* Hounsfield units), spacing 1 mm (``spacing_mm``), origin 0,
  identity direction, since the ``.npy`` files carry no geometry;
- instances: each box is painted as a solid block ``[zmin, zmax] x [ymin, ymax] x [xmin, xmax]``, so the box of
  the converted instance (:mod:`pretrain_det3d.data.boxes`) is exactly
  ``(zmin - 1, ymin - 1, xmin - 1, zmax + 1, ymax + 1, xmax + 1)``. Larger boxes are painted first, so a nodule inside or overlapping a larger one keeps its
  whole box; where the larger one loses part of its box to it, the case and box are recorded in
  ``dataset.json`` (``boxes_changed_by_overlap``). A row repeating a box of the same scan is painted once (the
  first row's class is kept). Boxes reaching past
  the volume are clipped (and recorded); boxes wholly outside are dropped (and recorded);
- classes (setting ``classes``): ``nodule`` (default, one class, as lung-nodule detection is evaluated) or
  ``types``: PN9's nine classes in :data:`PN9_CLASSES` order;
- cases: every ``*_zoom.npy`` found; scans without annotation rows are kept as negatives. SANet leaves five
  scans out of training (``blacklist`` in its ``config.py``); ``exclude`` (list of case ids) does the same here
  and is empty by default.

Example:
    >>> PN9Converter().convert("raw/pn9", "converted/pn9")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter
from pretrain_det3d.data.converters.label_maps import relabel
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.settings.converters import PN9ConvertSettings

#: PN9's nine nodule classes (the ``nodule_class`` values), class-index order for ``classes: types``
PN9_CLASSES = ("0-3SN", "3-10SN", "10-30SN", ">30SN", "0-5GGN", ">5GGN", "0-5PSN", ">5PSN", "CN")
SINGLE_CLASS_NAME = "nodule"
CLASS_MODES = ("nodule", "types")
ANNOTATION_COLUMNS = ("pid", "nodule_class", "xmin", "xmax", "ymin", "ymax", "zmin", "zmax")
DEFAULT_ANNOTATION_FILES = PN9ConvertSettings.default("annotation_files")
SPLIT_FILES = ("train.txt", "val.txt", "test.txt")
DEFAULT_IMAGE_SUFFIX = PN9ConvertSettings.default("image_suffix")
# the publisher resampled every scan to 1 mm isotropic
DEFAULT_SPACING_MM = PN9ConvertSettings.default("spacing_mm")
#: box columns in array-axis order (z, y, x), each (min, max) inclusive
BOX_COLUMNS = (("zmin", "zmax"), ("ymin", "ymax"), ("xmin", "xmax"))


def read_pn9_annotations(paths: list[Path]) -> pd.DataFrame:
    """Concatenate PN9 box tables, checking columns and values; adds ``source`` (file) and ``line`` columns.

    Example:
        >>> read_pn9_annotations([Path("train_anno.csv")]).columns[:3].tolist()  # doctest: +SKIP
        ['pid', 'nodule_class', 'xmin']
    """
    tables = []
    for path in paths:
        table = pd.read_csv(path, skipinitialspace=True)
        table.columns = [str(c).strip() for c in table.columns]
        missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
        if missing:
            raise ConversionError.for_file(path, f"missing columns {missing}; expected at least {list(ANNOTATION_COLUMNS)}")
        table = table[list(ANNOTATION_COLUMNS)].copy()
        table["source"] = str(path)
        table["line"] = np.arange(len(table)) + 2  # line 1 is the header
        coordinates = table[[c for pair in BOX_COLUMNS for c in pair] + ["pid"]]
        numeric = coordinates.apply(pd.to_numeric, errors="coerce")
        bad = numeric.isna().any(axis=1) | (numeric != np.round(numeric)).any(axis=1)
        if bad.any():
            line = int(table["line"][bad].iloc[0])
            raise ConversionError.for_file(path, f"line {line}: pid and box coordinates must be integers")
        table[numeric.columns] = numeric.astype(np.int64)
        for low, high in BOX_COLUMNS:
            inverted = table[low] > table[high]
            if inverted.any():
                line = int(table["line"][inverted].iloc[0])
                raise ConversionError.for_file(path, f"line {line}: {low} > {high}")
        table["nodule_class"] = table["nodule_class"].astype(str).str.strip()
        unknown = sorted(set(table["nodule_class"]) - set(PN9_CLASSES))
        if unknown:
            raise ConversionError.for_file(path, f"unknown nodule_class {unknown}; PN9 has {list(PN9_CLASSES)}")
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[*ANNOTATION_COLUMNS, "source", "line"])


def paint_boxes(shape: tuple[int, int, int], boxes: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """Paint inclusive boxes ``[[z0, z1, y0, y1, x0, x1], ...]`` as instances, larger boxes first.

    Returns ``(instance_map, kept_rows, changed_rows)``: instance ``k`` of the map is box ``kept_rows[k - 1]``
    (rows in their given order; a row vanishes only if smaller boxes cover it whole), and ``changed_rows`` are
    the rows whose box in the map differs from the given one (cut by a smaller, overlapping box).

    Example:
        >>> m, kept, changed = paint_boxes((4, 4, 4), np.array([[0, 3, 0, 3, 0, 1], [0, 3, 0, 3, 1, 1]]))
        >>> int((m == 1).sum()), int((m == 2).sum()), kept, changed
        (16, 16, [0, 1], [0])
    """
    volumes = np.prod(boxes[:, 1::2] - boxes[:, 0::2] + 1, axis=1) if len(boxes) else np.zeros(0)
    painted = np.zeros(shape, dtype=np.int32)
    for row in np.argsort(-volumes, kind="stable"):  # larger first: a smaller nodule is never hidden
        z0, z1, y0, y1, x0, x1 = (int(v) for v in boxes[row])
        painted[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = row + 1
    found = ndimage.find_objects(painted, max_label=len(boxes))  # one pass for all boxes
    kept, changed = [], []
    for row, box in enumerate(boxes):
        if found[row] is None:
            changed.append(row)
            continue
        kept.append(row)
        recovered = [v for s in found[row] for v in (s.start, s.stop - 1)]  # inclusive, like the CSV
        if recovered != [int(v) for v in box]:
            changed.append(row)
    return relabel(painted, [row + 1 for row in kept]), kept, changed


@CONVERTERS.register("pn9")
class PN9Converter(DatasetConverter):
    """Settings: ``classes`` (``nodule`` | ``types``), ``annotation_files`` (CSV names searched below the root,
    default :data:`DEFAULT_ANNOTATION_FILES`), ``image_suffix`` (default ``_zoom.npy``), ``spacing_mm``
    (default 1.0), ``exclude`` (case ids to leave out, default none)."""

    dataset_name = "pn9"
    modalities = ("CT",)
    class_names = (SINGLE_CLASS_NAME,)
    licence = "non-commercial research use only (PN9 terms of the SANet authors)"
    source = "https://github.com/mj129/SANet"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.class_mode = self.settings.get("classes", "nodule")
        if self.class_mode not in CLASS_MODES:
            raise ConversionError(f"pn9 converter: setting 'classes' must be one of {CLASS_MODES}, got {self.class_mode!r}")
        self.class_names = (SINGLE_CLASS_NAME,) if self.class_mode == "nodule" else PN9_CLASSES
        self.annotation_files = tuple(self.settings.get("annotation_files", DEFAULT_ANNOTATION_FILES))
        self.image_suffix = str(self.settings.get("image_suffix", DEFAULT_IMAGE_SUFFIX))
        self.spacing_mm = float(self.settings.get("spacing_mm", DEFAULT_SPACING_MM))
        self.exclude = {str(c) for c in self.settings.get("exclude", [])}
        self._record: dict[str, Any] = {"duplicate_rows": {}, "boxes_clipped": {}, "boxes_outside": {},
                                        "boxes_changed_by_overlap": {}}

    # ---- finding the files ---------------------------------------------------------------------------------
    def _index(self, source_dir: Path) -> None:
        if getattr(self, "_indexed_root", None) == source_dir:
            return
        images: dict[str, Path] = {}
        for path in sorted(source_dir.rglob(f"*{self.image_suffix}")):
            if path.name.startswith(".") or not path.is_file():
                continue
            case = path.name[: -len(self.image_suffix)]
            if not re.fullmatch(r"\d+", case):
                raise ConversionError.for_file(path, f"expected a numeric PN9 scan id before {self.image_suffix!r}")
            if case in images:
                raise ConversionError.for_file(path, f"scan {case} is also at {images[case]}")
            images[case] = path
        csvs: list[Path] = []
        for name in self.annotation_files:
            found = sorted(p for p in source_dir.rglob(name) if p.is_file())
            if len(found) != 1:
                raise ConversionError.for_file(source_dir / name, f"expected exactly one {name} below {source_dir}, "
                                                                  f"found {len(found)}")
            csvs.append(found[0])
        table = read_pn9_annotations(csvs)
        self._images = {c: p for c, p in images.items() if c not in self.exclude}
        self._indexed_root = source_dir
        self._rows = {int(pid): rows for pid, rows in table.groupby("pid")}
        pids = {int(c) for c in images}
        self._record["annotated_scans_without_image"] = sorted(int(p) for p in set(self._rows) - pids)
        self._record["annotation_files"] = [str(p.relative_to(source_dir)) for p in csvs]
        self._record["excluded"] = sorted(self.exclude & set(images))
        splits = {}
        for name in SPLIT_FILES:
            found = sorted(p for p in source_dir.rglob(name) if p.is_file())
            if len(found) == 1:
                splits[name[:-4]] = [line.strip() for line in found[0].read_text().splitlines() if line.strip()]
        self._record["official_split"] = splits

    def list_cases(self, source_dir: Path) -> list[str]:
        self._index(source_dir)
        return sorted(self._images)

    # ---- one case -----------------------------------------------------------------------------------------
    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        self._index(source_dir)
        path = self._images[case_id]
        try:  # load_npy checks the file's size against its header: a cut-short download is named as such
            volume = load_npy(path, mmap_mode="r", regenerate="download or extract the PN9 source again")
        except (OSError, ValueError) as error:
            raise ConversionError(str(error) if str(error).startswith(str(path)) else f"{path}: {error}") from None
        if volume.ndim == 4 and volume.shape[0] == 1:
            volume = volume[0]  # [1, D, H, W] -> [D, H, W]
        if volume.ndim != 3:
            raise ConversionError.for_file(path, f"expected shape [1, D, H, W] or [D, H, W], got {volume.shape}")
        shape = tuple(int(s) for s in volume.shape)
        rows = self._rows.get(int(case_id))
        boxes, classes = self._boxes_of(case_id, rows, shape)
        instance_map, kept, changed = paint_boxes(shape, boxes)
        if changed:
            self._record["boxes_changed_by_overlap"][case_id] = [boxes[i].tolist() for i in changed]
        instances = {new_id: classes[row] for new_id, row in enumerate(kept, start=1)}
        return ConvertedCase(
            case_id=case_id,
            image=np.asarray(volume)[None],  # [1, Z, Y, X]
            instance_map=instance_map,
            instances=instances,
            spacing=(self.spacing_mm,) * 3,
            origin=(0.0, 0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )

    def _boxes_of(self, case_id: str, rows: pd.DataFrame | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
        """Inclusive boxes ``[z0, z1, y0, y1, x0, x1]`` (deduplicated, clipped) and their class indices."""
        boxes, classes, seen = [], [], set()
        if rows is None:
            return np.zeros((0, 6), dtype=np.int64), []
        for row in rows.itertuples(index=False):
            box = [int(getattr(row, column)) for pair in BOX_COLUMNS for column in pair]
            if tuple(box) in seen:
                self._record["duplicate_rows"].setdefault(case_id, []).append(f"{Path(row.source).name}:{row.line}")
                continue
            seen.add(tuple(box))
            clipped = []
            for axis, size in enumerate(shape):
                low, high = box[2 * axis], box[2 * axis + 1]
                clipped += [max(low, 0), min(high, size - 1)]
            if any(clipped[2 * a] > clipped[2 * a + 1] for a in range(3)):
                self._record["boxes_outside"].setdefault(case_id, []).append(box)
                continue
            if clipped != box:
                self._record["boxes_clipped"].setdefault(case_id, []).append(box)
            boxes.append(clipped)
            classes.append(0 if self.class_mode == "nodule" else PN9_CLASSES.index(row.nodule_class))
        return np.asarray(boxes, dtype=np.int64).reshape(-1, 6), classes

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": {
            "converter": "pn9",
            "classes": self.class_mode,
            "spacing_mm": self.spacing_mm,
            "intensities": "as published: 0-255 after the publisher's windowing, not Hounsfield units",
            "rule": "each CSV box [min, max] inclusive painted as a solid block (larger boxes first), so the "
                    "converted box is (zmin, ymin, xmin, zmax+1, ymax+1, xmax+1); origin 0, identity direction",
            **self._record,
        }}
