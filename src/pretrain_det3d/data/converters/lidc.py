"""LIDC-IDRI (lung nodules in CT): DICOM series plus the four readers' XML outlines, merged by a consensus rule.

Source layout (TCIA: NBIA Data Retriever download, plus the XML files either inside each series folder or from
``LIDC-XML-only.zip``; any folder layout works, files are matched by uid)::

    LIDC-IDRI/LIDC-IDRI-0001/{study}/{series}/1-001.dcm ...    DICOM CT slices
    .../069.xml                                                 LidcReadMessage, one per CT series

The XML (namespace ``http://www.nih.gov``): ``ResponseHeader/SeriesInstanceUid`` names the series; each
``readingSession`` is one radiologist; ``unblindedReadNodule`` one nodule marked by that reader, holding one
``roi`` per slice (``imageSOP_UID``, ``imageZposition``, ``inclusion`` TRUE/FALSE, and ``edgeMap`` points
``xCoord`` = column, ``yCoord`` = row, 0-based pixels). Nodules >= 3 mm carry outlines; nodules < 3 mm are a
single point; ``nonNodule`` marks other findings.

Consensus rule (the defaults; each is a setting):

1. A reader's nodule is kept when it has an outline (some roi with more than one edge-map point), i.e. the
   readers' ">= 3 mm nodule" category. Single-point (< 3 mm) nodules and ``nonNodule`` marks are dropped.
2. Its voxels: on each roi's slice (found by ``imageSOP_UID``; by ``imageZposition`` if the uid is not in the
   series) the outline points are drawn and the enclosed area filled (outline included); rois with
   ``inclusion`` FALSE (holes) are removed afterwards.
3. Annotations that share at least one voxel are linked; the connected groups are nodules. A nodule is kept when
   at least ``min_readers`` (2) distinct readers marked it: "marked by >= 2 of 4 readers".
4. Its consensus voxels are those covered by at least ``voxel_agreement`` (50 %) of the group's annotations
   (pylidc's ``consensus(clevel=0.5)`` idea); the instance is those voxels, its box their extent.

Cases are named by ``PatientID`` (``LIDC-IDRI-0001``; a second CT series of the same patient gets ``_2``).

Example:
    >>> LIDCConverter().convert("raw/lidc", "converted/lidc")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.dicom import (
    TAG_IMAGE_POSITION, TAG_MODALITY, TAG_PATIENT_ID, TAG_SOP_INSTANCE_UID, find_dicom_series, read_dicom_series,
    read_header,
)
from pretrain_det3d.settings.converters import LIDCConvertSettings

DEFAULT_MIN_READERS = LIDCConvertSettings.default("min_readers")
DEFAULT_VOXEL_AGREEMENT = LIDCConvertSettings.default("voxel_agreement")
Z_POSITION_TOLERANCE_MM = 0.05  # matching imageZposition to ImagePositionPatient z when the SOP uid is unknown


def _local(tag: str) -> str:
    """Element name without its XML namespace (``{http://www.nih.gov}roi`` -> ``roi``)."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((c for c in element if _local(c.tag) == name), None)


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ElementTree.Element, name: str, default: str = "") -> str:
    child = _child(element, name)
    return child.text.strip() if child is not None and child.text else default


@dataclass
class ReaderRoi:
    """One slice of a reader's nodule outline."""

    sop_uid: str
    z_position: float
    inclusion: bool
    points_xy: list[tuple[int, int]]


@dataclass
class ReaderNodule:
    """One nodule as one reader marked it."""

    reader: int
    nodule_id: str
    rois: list[ReaderRoi] = field(default_factory=list)

    @property
    def has_outline(self) -> bool:
        return any(len(roi.points_xy) > 1 for roi in self.rois)


@dataclass
class LidcReadMessage:
    """The parts of one LIDC XML file the converter uses."""

    path: Path
    series_uid: str
    nodules: list[ReaderNodule]
    num_readers: int


def parse_lidc_xml(path: str | Path) -> LidcReadMessage | None:
    """Parse a LIDC reader XML; ``None`` for files that are not CT read messages (e.g. chest radiographs)."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ConversionError.for_file(path, f"malformed XML ({error})") from None
    if _local(root.tag) != "LidcReadMessage":
        return None
    sessions = _children(root, "readingSession")
    header = _child(root, "ResponseHeader")
    if not sessions:
        return None  # CXR messages hold CXRreadingSession elements instead
    series_uid = _text(header, "SeriesInstanceUid") if header is not None else ""
    if not series_uid:
        raise ConversionError.for_file(path, "ResponseHeader/SeriesInstanceUid is missing")
    nodules: list[ReaderNodule] = []
    for reader, session in enumerate(sessions):
        for element in _children(session, "unblindedReadNodule"):
            nodule = ReaderNodule(reader=reader, nodule_id=_text(element, "noduleID"))
            for roi in _children(element, "roi"):
                try:
                    points = [(int(_text(e, "xCoord")), int(_text(e, "yCoord"))) for e in _children(roi, "edgeMap")]
                    z_position = float(_text(roi, "imageZposition", "nan"))
                except ValueError as error:
                    raise ConversionError.for_file(path, f"reader {reader + 1}, nodule {nodule.nodule_id!r}: "
                                                         f"bad roi coordinates ({error})") from None
                nodule.rois.append(ReaderRoi(
                    sop_uid=_text(roi, "imageSOP_UID"), z_position=z_position,
                    inclusion=_text(roi, "inclusion", "TRUE").upper() == "TRUE", points_xy=points))
            nodules.append(nodule)
    return LidcReadMessage(path, series_uid, nodules, len(sessions))


def _fill_outline(points_xy: list[tuple[int, int]]) -> np.ndarray:
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
        if roi.sop_uid in sop_to_slice:
            k = sop_to_slice[roi.sop_uid]
        else:
            matches = np.nonzero(np.abs(slice_z - roi.z_position) <= Z_POSITION_TOLERANCE_MM)[0]
            if len(matches) != 1:
                raise ConversionError.for_file(xml_path, f"nodule {nodule.nodule_id!r} of reader {nodule.reader + 1}: "
                                                         f"slice {roi.sop_uid} (z={roi.z_position}) is not in the series")
            k = int(matches[0])
        if not roi.points_xy:
            continue
        pixels = _fill_outline(roi.points_xy) if len(roi.points_xy) > 1 else np.asarray(
            [(y, x) for x, y in roi.points_xy])
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


def consensus_nodules(annotations: list[tuple[int, np.ndarray]], min_readers: int = DEFAULT_MIN_READERS,
                      voxel_agreement: float = DEFAULT_VOXEL_AGREEMENT) -> list[np.ndarray]:
    """Group overlapping annotations ``(reader, flat voxels)``; return each kept group's consensus voxels.

    Example:
        >>> a, b, c = np.array([1, 2, 3]), np.array([3, 4]), np.array([9])
        >>> [v.tolist() for v in consensus_nodules([(0, a), (1, b), (2, c)])]  # c has one reader only
        [[1, 2, 3, 4]]
    """
    count = len(annotations)
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(count):
        for j in range(i + 1, count):
            if np.intersect1d(annotations[i][1], annotations[j][1], assume_unique=True).size:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    kept: list[np.ndarray] = []
    for members in sorted(groups.values()):
        if len({annotations[i][0] for i in members}) < min_readers:
            continue
        voxels, votes = np.unique(np.concatenate([annotations[i][1] for i in members]), return_counts=True)
        needed = max(1, math.ceil(voxel_agreement * len(members) - 1e-9))
        consensus = voxels[votes >= needed]
        if consensus.size:
            kept.append(consensus)
    return kept


@CONVERTERS.register("lidc")
class LIDCConverter(DatasetConverter):
    """Settings: ``min_readers`` (default 2), ``voxel_agreement`` (default 0.5)."""

    dataset_name = "lidc"
    modalities = ("CT",)
    class_names = ("nodule",)
    licence = "CC-BY-3.0 (TCIA LIDC-IDRI)"
    source = "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX"

    def _index(self, source_dir: Path) -> dict[str, tuple[LidcReadMessage, object]]:
        if getattr(self, "_cases", None) is None:
            series = find_dicom_series(source_dir)
            cases: dict[str, tuple[LidcReadMessage, object]] = {}
            for xml_path in sorted(source_dir.rglob("*.xml")):
                message = parse_lidc_xml(xml_path)
                if message is None:
                    continue
                if message.series_uid not in series:
                    continue  # the XML-only archive covers all 1018 scans; a partial image download is fine
                dicom = series[message.series_uid]
                header = read_header(dicom.files[0], (TAG_PATIENT_ID, TAG_MODALITY))
                if header.get(TAG_MODALITY, "CT") != "CT":
                    continue
                patient = header.get(TAG_PATIENT_ID) or dicom.folder.name
                case_id, suffix = patient, 2
                while case_id in cases:
                    case_id, suffix = f"{patient}_{suffix}", suffix + 1
                cases[case_id] = (message, dicom)
            self._cases = cases
        return self._cases

    def list_cases(self, source_dir: Path) -> list[str]:
        return sorted(self._index(source_dir))

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        message, dicom = self._index(source_dir)[case_id]
        image, slice_tags = read_dicom_series(dicom, (TAG_SOP_INSTANCE_UID, TAG_IMAGE_POSITION))
        shape = tuple(image.GetSize()[::-1])  # (z, y, x)
        sop_to_slice = {tags.get(TAG_SOP_INSTANCE_UID, ""): k for k, tags in enumerate(slice_tags)}
        slice_z = np.array([float(tags.get(TAG_IMAGE_POSITION, "nan\\nan\\nan").split("\\")[2]) for tags in slice_tags])
        annotations = [
            (nodule.reader, nodule_voxels(nodule, sop_to_slice, slice_z, shape, message.path))
            for nodule in message.nodules if nodule.has_outline
        ]
        annotations = [(reader, voxels) for reader, voxels in annotations if voxels.size]
        nodules = consensus_nodules(annotations, int(self.settings.get("min_readers", DEFAULT_MIN_READERS)),
                                    float(self.settings.get("voxel_agreement", DEFAULT_VOXEL_AGREEMENT)))
        instance_map = np.zeros(shape, dtype=np.int16)
        flat = instance_map.reshape(-1)  # a view: writing it fills the [Z, Y, X] map
        for instance_id, voxels in enumerate(nodules, start=1):
            flat[voxels] = instance_id
        return case_from_sitk(case_id, [image], instance_map, {i: 0 for i in range(1, len(nodules) + 1)})

    def dataset_extra(self) -> dict:
        return {"conversion": {
            "consensus": "reader nodules with outlines (>= 3 mm), grouped by voxel overlap, kept when marked by "
                         ">= min_readers readers; consensus voxels covered by >= voxel_agreement of the group",
            "min_readers": int(self.settings.get("min_readers", DEFAULT_MIN_READERS)),
            "voxel_agreement": float(self.settings.get("voxel_agreement", DEFAULT_VOXEL_AGREEMENT)),
        }}
