"""LIDC-IDRI (lung nodules in CT): one case per CT series, nodules from the four readers' XML outlines.

Source layout (TCIA: NBIA Data Retriever download, plus the XML files either inside each series folder or from
``LIDC-XML-only.zip``; any folder layout works, files are matched by uid)::

    LIDC-IDRI/LIDC-IDRI-0001/{study}/{series}/1-001.dcm ...    DICOM CT slices
    .../069.xml                                                 LidcReadMessage, one per CT series
    LIDC-XML-only/tcia-lidc-xml/157/158.xml ...                 the same messages again, from the zip

The XML (namespace ``http://www.nih.gov``): ``ResponseHeader/SeriesInstanceUid`` names the series; each
``readingSession`` is one radiologist; ``unblindedReadNodule`` one nodule marked by that reader, holding its
``characteristics`` (``malignancy`` 1-5) and one ``roi`` per slice (``imageSOP_UID``, ``imageZposition``,
``inclusion`` TRUE/FALSE, and ``edgeMap`` points ``xCoord`` = column, ``yCoord`` = row, 0-based pixels). Nodules
>= 3 mm carry outlines; nodules < 3 mm are a single point; ``nonNodule`` marks other findings.

Cases: one per CT series (``SeriesInstanceUID``) that has a read message. A series whose message lies in the
copy twice (the TCIA download and the XML-only zip) is one case: its files are merged session by session, a
session identical to one already read is skipped, and ``dataset.json`` (``conversion.xml_files``) lists which
files were read and how many sessions each contributed. Cases are named by ``PatientID`` (``LIDC-IDRI-0001``);
a patient with several annotated CT series gets ``LIDC-IDRI-0001_1``, ``_2`` ... in the order of their series
uids, and ``conversion.series`` maps every case to its series uid.

Nodules, as nnDetection's LIDC preparation (``projects/Task012_LIDC/scripts/prepare_mic.py`` on the masks of
MIC-DKFZ/LIDC-IDRI-processing), rebuilt from the XML:

1. A reader's nodule counts when it has an outline; its voxels are, on each roi's slice (found by
   ``imageSOP_UID``; by ``imageZposition`` if the uid is not in the series), the area the outline encloses,
   outline included; rois with fewer than two points are left out, rois with ``inclusion`` FALSE (holes) are
   removed afterwards. Single-point (< 3 mm) nodules and ``nonNodule`` marks are dropped.
2. Readers' nodules that share at least ``min_overlap_voxels`` (11, "more than 10" as LIDC-IDRI-processing)
   voxels are one nodule (linked transitively).
3. A nodule's voxels are those covered by at least ``voxel_agreement`` (0.5) of the four readers, readers who
   did not mark it counting as empty masks: 2 of 4 (nnDetection: mean of the four readers' masks >= 0.5). A
   nodule with no such voxel is dropped (one marked by a single reader always is). Where two nodules' voxels
   meet, the later one takes them.
4. Classes: ``nodule`` (default), or with ``classes: malignancy`` ``benign`` (0) / ``malignant`` (1) by the mean
   malignancy rating >= 3 (nnDetection's LIDC classes). ``malignancy_mean: four_readers`` (default, as
   nnDetection) averages over the four readers with 0 for a reader who did not mark the nodule (so a nodule
   marked by two readers is never malignant: at most 10 / 4 = 2.5); ``marking_readers`` averages over the
   readers who rated it. The scores are kept in ``dataset.json``.

A series read by more than four sessions (after merging) uses that count in place of four.

Example:
    >>> LIDCConverter().convert("raw/lidc", "converted/lidc")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.dicom import (
    TAG_IMAGE_POSITION, TAG_MODALITY, TAG_PATIENT_ID, TAG_SOP_INSTANCE_UID, DicomSeries, find_dicom_series,
    read_dicom_series, read_header,
)
from pretrain_det3d.data.converters.label_maps import instance_dtype
from pretrain_det3d.settings.converters import LIDCConvertSettings

DEFAULTS = {key: LIDCConvertSettings.default(key) for key in LIDCConvertSettings.keys()}
DEFAULT_VOXEL_AGREEMENT = DEFAULTS["voxel_agreement"]
LIDC_READERS = 4  # readers per CT scan in LIDC's design; the denominator of the agreement
MALIGNANT_FROM = 3.0  # mean malignancy rating from which a nodule is "malignant" (nnDetection)
MALIGNANCY_CLASSES = ("benign", "malignant")
Z_POSITION_TOLERANCE_MM = 0.05  # matching imageZposition to ImagePositionPatient z when the SOP uid is unknown


def _local(tag: str) -> str:
    """Element name without its XML namespace (``{http://www.nih.gov}roi`` -> ``roi``)."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((c for c in element if _local(c.tag) == name), None)


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ElementTree.Element | None, name: str, default: str = "") -> str:
    child = _child(element, name) if element is not None else None
    return child.text.strip() if child is not None and child.text else default


@dataclass(frozen=True)
class ReaderRoi:
    """One slice of a reader's nodule outline."""

    sop_uid: str
    z_position: float
    inclusion: bool
    points_xy: tuple[tuple[int, int], ...]


@dataclass
class ReaderNodule:
    """One nodule as one reader marked it (``reader``: index of the session in the merged read message)."""

    reader: int
    nodule_id: str
    malignancy: int | None = None
    rois: list[ReaderRoi] = field(default_factory=list)

    @property
    def has_outline(self) -> bool:
        return any(len(roi.points_xy) > 1 for roi in self.rois)

    def signature(self) -> tuple:
        return (self.nodule_id, self.malignancy, tuple(self.rois))


@dataclass
class ReadingSession:
    """One radiologist's reading of the series."""

    radiologist: str
    nodules: list[ReaderNodule]

    def signature(self) -> tuple:
        """What makes two sessions the same reading (the XML's formatting does not count)."""
        return (self.radiologist, tuple(n.signature() for n in self.nodules))


@dataclass
class LidcReadMessage:
    """The parts of one LIDC XML file (or of several merged ones) the converter uses."""

    path: Path
    series_uid: str
    sessions: list[ReadingSession]

    @property
    def num_readers(self) -> int:
        return len(self.sessions)

    @property
    def nodules(self) -> list[ReaderNodule]:
        """Every reader's nodules, ``reader`` set to the session's index."""
        out = []
        for reader, session in enumerate(self.sessions):
            for nodule in session.nodules:
                nodule.reader = reader
                out.append(nodule)
        return out


def parse_lidc_xml(path: str | Path) -> LidcReadMessage | None:
    """Parse a LIDC reader XML; ``None`` for files that are not CT read messages (e.g. chest radiographs)."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ConversionError.for_file(path, f"malformed XML ({error})") from None
    if _local(root.tag) != "LidcReadMessage":
        return None
    session_elements = _children(root, "readingSession")
    if not session_elements:
        return None  # CXR messages hold CXRreadingSession elements instead
    series_uid = _text(_child(root, "ResponseHeader"), "SeriesInstanceUid")
    if not series_uid:
        raise ConversionError.for_file(path, "ResponseHeader/SeriesInstanceUid is missing")
    sessions: list[ReadingSession] = []
    for reader, element in enumerate(session_elements):
        nodules = []
        for nodule_element in _children(element, "unblindedReadNodule"):
            nodule_id = _text(nodule_element, "noduleID")
            rating = _text(_child(nodule_element, "characteristics"), "malignancy")
            nodule = ReaderNodule(reader=reader, nodule_id=nodule_id, malignancy=int(rating) if rating.isdigit() else None)
            for roi in _children(nodule_element, "roi"):
                try:
                    points = tuple((int(_text(e, "xCoord")), int(_text(e, "yCoord"))) for e in _children(roi, "edgeMap"))
                    z_position = float(_text(roi, "imageZposition", "nan"))
                except ValueError as error:
                    raise ConversionError.for_file(path, f"reader {reader + 1}, nodule {nodule_id!r}: "
                                                         f"bad roi coordinates ({error})") from None
                nodule.rois.append(ReaderRoi(
                    sop_uid=_text(roi, "imageSOP_UID"), z_position=z_position,
                    inclusion=_text(roi, "inclusion", "TRUE").upper() == "TRUE", points_xy=points))
            nodules.append(nodule)
        sessions.append(ReadingSession(_text(element, "servicingRadiologistID"), nodules))
    return LidcReadMessage(path, series_uid, sessions)


def merge_read_messages(messages: list[LidcReadMessage]) -> tuple[LidcReadMessage, dict[str, int]]:
    """One message per series from several files that describe it: sessions in file order, a session identical to
    one already taken skipped. Returns the merged message and, per file, how many sessions it contributed.

    Example (the copy from the XML-only zip adds no session):
        >>> merged, taken = merge_read_messages([a, a_copy])  # doctest: +SKIP
        >>> taken  # doctest: +SKIP
        {'.../069.xml': 4, '.../LIDC-XML-only/.../069.xml': 0}
    """
    seen: set[tuple] = set()
    sessions: list[ReadingSession] = []
    taken: dict[str, int] = {}
    for message in messages:
        taken[str(message.path)] = 0
        for session in message.sessions:
            signature = session.signature()
            if signature in seen:
                continue
            seen.add(signature)
            sessions.append(session)
            taken[str(message.path)] += 1
    return LidcReadMessage(messages[0].path, messages[0].series_uid, sessions), taken


def _fill_outline(points_xy: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Pixels ``[N, 2]`` (row, col) enclosed by an outline, the outline included."""
    points = np.asarray(points_xy, dtype=np.int64)  # [N, (x, y)]
    low = points.min(axis=0) - 1  # one pixel of margin so the outside is connected around the outline
    size = points.max(axis=0) - low + 2
    canvas = np.zeros((size[1], size[0]), dtype=bool)  # [rows, cols]
    canvas[points[:, 1] - low[1], points[:, 0] - low[0]] = True
    filled = ndimage.binary_fill_holes(canvas)
    rows, cols = np.nonzero(filled)
    return np.stack([rows + low[1], cols + low[0]], axis=1)


def nodule_voxels(nodule: ReaderNodule, sop_to_slice: dict[str, int], slice_z: np.ndarray,
                  shape_zyx: tuple[int, int, int], xml_path: Path) -> np.ndarray:
    """Flat voxel indices (into ``shape_zyx``) of one reader's nodule: inclusion rois minus exclusion rois."""
    included: list[np.ndarray] = []
    excluded: list[np.ndarray] = []
    for roi in nodule.rois:
        if len(roi.points_xy) < 2:
            continue  # no outline on this slice (LIDC-IDRI-processing draws none either)
        if roi.sop_uid in sop_to_slice:
            k = sop_to_slice[roi.sop_uid]
        else:
            matches = np.nonzero(np.abs(slice_z - roi.z_position) <= Z_POSITION_TOLERANCE_MM)[0]
            if len(matches) != 1:
                raise ConversionError.for_file(xml_path, f"nodule {nodule.nodule_id!r} of reader {nodule.reader + 1}: "
                                                         f"slice {roi.sop_uid} (z={roi.z_position}) is not in the series")
            k = int(matches[0])
        pixels = _fill_outline(roi.points_xy)
        inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < shape_zyx[1]) & (pixels[:, 1] >= 0) & (pixels[:, 1] < shape_zyx[2])
        if not inside.all():
            raise ConversionError.for_file(xml_path, f"nodule {nodule.nodule_id!r} of reader {nodule.reader + 1}: "
                                                     f"outline leaves the {shape_zyx[1]}x{shape_zyx[2]} slice")
        flat = np.ravel_multi_index((np.full(len(pixels), k), pixels[:, 0], pixels[:, 1]), shape_zyx)
        (included if roi.inclusion else excluded).append(flat)
    voxels = np.unique(np.concatenate(included)) if included else np.zeros(0, dtype=np.int64)
    if excluded:
        voxels = np.setdiff1d(voxels, np.concatenate(excluded))
    return voxels


@dataclass
class ConsensusNodule:
    """One nodule after grouping the readers' annotations: its voxels and the readers' ratings."""

    voxels: np.ndarray
    readers: list[int]
    ratings: list[int]  # malignancy ratings of the marking readers that gave one


def group_annotations(annotations: list[tuple[int, np.ndarray]], min_overlap_voxels: int) -> list[list[int]]:
    """Indices of ``annotations`` ``(reader, flat voxels)`` grouped by shared voxels (transitively), groups in the
    order of their first member.

    Example:
        >>> a, b, c = np.arange(0, 20), np.arange(5, 30), np.arange(100, 120)
        >>> group_annotations([(0, a), (1, b), (2, c)], min_overlap_voxels=11)
        [[0, 1], [2]]
    """
    parent = list(range(len(annotations)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(annotations)):
        for j in range(i + 1, len(annotations)):
            shared = np.intersect1d(annotations[i][1], annotations[j][1], assume_unique=True).size
            if shared >= min_overlap_voxels:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(annotations)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def consensus_nodules(annotations: list[tuple[int, np.ndarray]], ratings: list[int | None] | None = None,
                      num_readers: int = LIDC_READERS, voxel_agreement: float = DEFAULT_VOXEL_AGREEMENT,
                      min_overlap_voxels: int = DEFAULTS["min_overlap_voxels"]) -> tuple[list[ConsensusNodule], int]:
    """Group the readers' annotations ``(reader, flat voxels)`` and keep each group's voxels covered by at least
    ``voxel_agreement`` of ``num_readers`` readers. Returns the kept nodules and how many groups had no such voxel.

    A reader who drew two annotations of one group counts once (their union).

    Example:
        >>> a, b, c = np.arange(0, 20), np.arange(5, 30), np.arange(100, 120)
        >>> kept, dropped = consensus_nodules([(0, a), (1, b), (2, c)])  # c: one reader of four
        >>> kept[0].voxels.tolist() == list(range(5, 20)), kept[0].readers, dropped
        (True, [0, 1], 1)
    """
    ratings = ratings if ratings is not None else [None] * len(annotations)
    needed = max(1, math.ceil(voxel_agreement * num_readers - 1e-9))
    kept: list[ConsensusNodule] = []
    dropped = 0
    for members in group_annotations(annotations, min_overlap_voxels):
        per_reader: dict[int, np.ndarray] = {}
        for i in members:
            reader, voxels = annotations[i]
            per_reader[reader] = np.union1d(per_reader[reader], voxels) if reader in per_reader else voxels
        voxels, votes = np.unique(np.concatenate(list(per_reader.values())), return_counts=True)
        consensus = voxels[votes >= needed]
        if not consensus.size:
            dropped += 1
            continue
        first_rating: dict[int, int] = {}
        for i in members:
            if ratings[i] is not None:
                first_rating.setdefault(annotations[i][0], int(ratings[i]))
        kept.append(ConsensusNodule(consensus, sorted(per_reader), [first_rating[r] for r in sorted(first_rating)]))
    return kept, dropped


def malignancy_score(nodule: ConsensusNodule, num_readers: int, rule: str) -> float:
    """Mean malignancy rating: over ``num_readers`` with 0 for readers who did not mark the nodule
    (``four_readers``, nnDetection), or over the readers who rated it (``marking_readers``); NaN without ratings.

    Example:
        >>> malignancy_score(ConsensusNodule(np.zeros(0), [0, 1, 2], [4, 5, 3]), 4, "four_readers")
        3.0
    """
    if rule == "four_readers":
        unmarked = max(0, num_readers - len(nodule.readers))
        values = nodule.ratings + [0] * unmarked
    else:
        values = list(nodule.ratings)
    return float(np.mean(values)) if values else float("nan")


@CONVERTERS.register("lidc")
class LIDCConverter(DatasetConverter):
    """Settings: ``voxel_agreement`` (0.5), ``min_overlap_voxels`` (11), ``classes`` (nodule | malignancy),
    ``malignancy_mean`` (four_readers | marking_readers); see the module docstring."""

    dataset_name = "lidc"
    modalities = ("CT",)
    class_names = ("nodule",)
    licence = "CC-BY-3.0 (TCIA LIDC-IDRI)"
    source = "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.option = {key: self.settings.get(key, default) for key, default in DEFAULTS.items()}
        if self.option["classes"] == "malignancy":
            self.class_names = MALIGNANCY_CLASSES
        self._cases: dict[str, tuple[LidcReadMessage, DicomSeries]] | None = None
        self._xml_files: dict[str, dict[str, int]] = {}
        self._series: dict[str, str] = {}
        self._scores: dict[str, dict[str, float]] = {}
        self._dropped: dict[str, int] = {}

    def _index(self, source_dir: Path) -> dict[str, tuple[LidcReadMessage, DicomSeries]]:
        if self._cases is not None:
            return self._cases
        series = find_dicom_series(source_dir)
        messages: dict[str, list[LidcReadMessage]] = {}
        for xml_path in sorted(source_dir.rglob("*.xml")):
            message = parse_lidc_xml(xml_path)
            if message is None or message.series_uid not in series:
                continue  # CXR messages; the XML-only archive covers all 1018 scans, a partial download is fine
            messages.setdefault(message.series_uid, []).append(message)
        by_patient: dict[str, list[tuple[str, LidcReadMessage, DicomSeries]]] = {}
        for series_uid, found in sorted(messages.items()):
            dicom = series[series_uid]
            header = read_header(dicom.files[0], (TAG_PATIENT_ID, TAG_MODALITY))
            if header.get(TAG_MODALITY, "CT") != "CT":
                continue
            merged, taken = merge_read_messages(found)
            if len(found) > 1:
                self._xml_files[series_uid] = taken
            patient = header.get(TAG_PATIENT_ID) or dicom.folder.name
            by_patient.setdefault(patient, []).append((series_uid, merged, dicom))
        cases: dict[str, tuple[LidcReadMessage, DicomSeries]] = {}
        for patient, entries in by_patient.items():
            for number, (series_uid, merged, dicom) in enumerate(entries, start=1):  # entries sorted by series uid
                case_id = patient if len(entries) == 1 else f"{patient}_{number}"
                cases[case_id] = (merged, dicom)
                self._series[case_id] = series_uid
        self._cases = cases
        return cases

    def list_cases(self, source_dir: Path) -> list[str]:
        return sorted(self._index(source_dir))

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        message, dicom = self._index(source_dir)[case_id]
        image, slice_tags = read_dicom_series(dicom, (TAG_SOP_INSTANCE_UID, TAG_IMAGE_POSITION))
        shape = tuple(image.GetSize()[::-1])  # (z, y, x)
        sop_to_slice = {tags.get(TAG_SOP_INSTANCE_UID, ""): k for k, tags in enumerate(slice_tags)}
        slice_z = np.array([float(tags.get(TAG_IMAGE_POSITION, "nan\\nan\\nan").split("\\")[2]) for tags in slice_tags])
        annotations, ratings = [], []
        for nodule in message.nodules:
            if not nodule.has_outline:
                continue
            voxels = nodule_voxels(nodule, sop_to_slice, slice_z, shape, message.path)
            if voxels.size:
                annotations.append((nodule.reader, voxels))
                ratings.append(nodule.malignancy)
        num_readers = max(LIDC_READERS, message.num_readers)
        nodules, dropped = consensus_nodules(annotations, ratings, num_readers, float(self.option["voxel_agreement"]),
                                             int(self.option["min_overlap_voxels"]))
        if dropped:
            self._dropped[case_id] = dropped
        # a later nodule takes shared voxels (nnDetection's painting order); one left with none is dropped
        remaining = [np.setdiff1d(n.voxels, np.concatenate([m.voxels for m in nodules[i + 1:]] or [np.zeros(0, int)]))
                     for i, n in enumerate(nodules)]
        present = [i + 1 for i, voxels in enumerate(remaining) if voxels.size]
        instance_map = np.zeros(shape, dtype=instance_dtype(len(present)))
        flat = instance_map.reshape(-1)  # a view: writing it fills the [Z, Y, X] map
        for new, old in enumerate(present, start=1):
            flat[remaining[old - 1]] = new
        scores = {new: malignancy_score(nodules[old - 1], num_readers, str(self.option["malignancy_mean"]))
                  for new, old in enumerate(present, start=1)}
        if self.option["classes"] == "malignancy":
            self._scores[case_id] = {str(k): round(v, 4) for k, v in scores.items()}
            instances = {k: int(v >= MALIGNANT_FROM) for k, v in scores.items()}
        else:
            instances = {k: 0 for k in scores}
        return case_from_sitk(case_id, [image], instance_map, instances)

    def dataset_extra(self) -> dict:
        return {"conversion": {
            "converter": "lidc",
            "rule": "one case per CT series; reader nodules with outlines grouped when they share >= min_overlap_voxels "
                    "voxels; voxels kept where >= voxel_agreement of the four readers marked them (nnDetection)",
            **{key: value for key, value in self.option.items()},
            "series": self._series,
            "xml_files": self._xml_files,
            "nodules_without_agreement": self._dropped,
            **({"malignancy_scores": self._scores} if self.option["classes"] == "malignancy" else {}),
        }}
