"""The image corruptions of Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021), as seeded functions.

Models Genesis learns by restoring an original patch from a corrupted copy. Per sample, in this order:

1. flips (an augmentation, applied to input *and* target): while a draw falls below ``flip_rate`` (0.4),
   at most ``max_flips`` (3) times, mirror a random spatial axis;
2. local pixel shuffling (probability 0.5): ``local_shuffle_blocks`` (10 000) small random boxes, each at most
   a tenth of the patch per axis, have their voxels permuted;
3. a non-linear intensity curve (probability 0.9): a random cubic Bezier curve through (0, 0) and (1, 1),
   made monotone; half the time the inverted (decreasing) curve;
4. painting (probability 0.9): in-painting (share 0.2: up to 5 boxes of 1/6-1/3 of each edge replaced by
   uniform noise, each box drawn with probability 0.95) or out-painting (share 0.8: everything replaced by
   noise except 1 to 5 boxes of 3/7-4/7 of each edge, which keep the image).

The rates are those of the original work (and of nnssl's port); their one definition is
``settings.pretraining.ModelsGenesisSettings``. Every function takes a ``numpy.random.Generator``, so a sample
is a pure function of its seed.

Intensity scale (``intensity``): the curve is defined on [0, 1] and the painting noise is uniform in [0, 1], so
the scale the corruptions see matters. Each variant is a per-channel affine map ``unit = (x - offset) / scale``
(:func:`intensity_map`); the corruptions act on ``unit`` and the result is mapped back with the same numbers,
so the network's input and target keep the corpus's z-score scale.

- ``zscore`` (the default; nnssl's ``ModelGenesisTrainer``): offset 0, scale 1, the z-scored patch as it is.
  The curve saturates: values below 0 go to the curve's value at 0, values above 1 to its value at 1; painted
  noise lies in [0, 1], i.e. between the mean and mean + 1 std of the corpus.
- ``patch_minmax``: each channel of the patch by its own minimum and maximum; nothing saturates and the noise
  spans the patch's range. A constant channel gets scale 1.
- ``hu_window`` (the original: CT clipped to [-1000, 1000] HU, scaled to [0, 1]): needs the corpus's CT
  z-score ``z = (HU - mean) / std`` (``hu_mean``, ``hu_std``, read from the corpus plan by the trainer), so
  ``offset = (hu_low - mean) / std`` and ``scale = (hu_high - hu_low) / std``. ``unit`` is clipped to [0, 1]
  as the original clips HU, and the target is the clipped patch (in z units), so an uncorrupted input equals
  its target.

Arrays are ``[C, Z, Y, X]``; boxes are ``((z0, y0, x0), (z1, y1, x1))`` with exclusive ends, in voxels.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(size=(1, 32, 32, 32)).astype(np.float32)
    >>> sample = genesis_pair(image, np.random.default_rng(1))
    >>> sample.corrupted.shape == sample.target.shape == image.shape
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Any, Sequence

import numpy as np

from pretrain_det3d.settings.pretraining import ModelsGenesisSettings

Box = tuple[tuple[int, int, int], tuple[int, int, int]]

# ---- the rates and sizes of Models Genesis (named defaults from the settings class; GenesisParams gathers them)
FLIP_RATE = ModelsGenesisSettings.default("flip_rate")
MAX_FLIPS = ModelsGenesisSettings.default("max_flips")
LOCAL_SHUFFLE_RATE = ModelsGenesisSettings.default("local_shuffle_rate")
LOCAL_SHUFFLE_BLOCKS = ModelsGenesisSettings.default("local_shuffle_blocks")
# a shuffled box is at most this fraction of the patch edge per axis (the original: edge // 10)
LOCAL_SHUFFLE_MAX_FRACTION = ModelsGenesisSettings.default("local_shuffle_max_fraction")
NONLINEAR_RATE = ModelsGenesisSettings.default("nonlinear_rate")
INVERT_RATE = ModelsGenesisSettings.default("invert_rate")  # share of the curves that are decreasing
# points on the curve used as the interpolation table; the original's 100 000 cost ~0.1 s per sample and add
# nothing: linear interpolation of a cubic between 1 000 points is off by < 1e-5 of the intensity range
BEZIER_SAMPLES = ModelsGenesisSettings.default("bezier_samples")
PAINT_RATE = ModelsGenesisSettings.default("paint_rate")
INPAINT_RATE = ModelsGenesisSettings.default("inpaint_rate")  # share of the paintings that are in-paintings
PAINT_MAX_BOXES = ModelsGenesisSettings.default("paint_max_boxes")  # painted (in) or kept (out) boxes
PAINT_CONTINUE_RATE = ModelsGenesisSettings.default("paint_continue_rate")  # probability to draw a (further) box
INTENSITY = ModelsGenesisSettings.default("intensity")
INTENSITY_VARIANTS = ("zscore", "patch_minmax", "hu_window")
HU_WINDOW = tuple(float(v) for v in ModelsGenesisSettings.default("hu_window"))
INPAINT_SIZE_FRACTION = (1 / 6, 1 / 3)  # edge of an in-painted box, as fractions of the patch edge
OUTPAINT_CUT_FRACTION = (3 / 7, 4 / 7)  # an out-painting box is the patch edge minus this fraction of it
PAINT_MARGIN = 3  # voxels kept free between a painting box and the patch border (when the patch allows)


@dataclass(frozen=True)
class GenesisParams:
    """Every knob of the Models Genesis corruption; the defaults are the original work's.

    Example:
        >>> GenesisParams.from_settings({"local_shuffle_blocks": 100}).local_shuffle_blocks
        100
    """

    flip_rate: float = FLIP_RATE
    max_flips: int = MAX_FLIPS
    local_shuffle_rate: float = LOCAL_SHUFFLE_RATE
    local_shuffle_blocks: int = LOCAL_SHUFFLE_BLOCKS
    local_shuffle_max_fraction: float = LOCAL_SHUFFLE_MAX_FRACTION
    nonlinear_rate: float = NONLINEAR_RATE
    invert_rate: float = INVERT_RATE
    bezier_samples: int = BEZIER_SAMPLES
    paint_rate: float = PAINT_RATE
    inpaint_rate: float = INPAINT_RATE
    paint_max_boxes: int = PAINT_MAX_BOXES
    paint_continue_rate: float = PAINT_CONTINUE_RATE
    intensity: str = INTENSITY
    hu_window: tuple[float, float] = HU_WINDOW  # type: ignore[assignment]
    # intensity 'hu_window' only: the corpus's CT z-score per channel, HU = z * hu_std + hu_mean (not settings:
    # the trainer reads them from the corpus plan)
    hu_mean: tuple[float, ...] | None = None
    hu_std: tuple[float, ...] | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "GenesisParams":
        """The known keys of ``settings`` over the defaults (others belong to the training loop)."""
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in settings.items() if k in known}
        for key in ("hu_window", "hu_mean", "hu_std"):  # lists from a config file -> tuples (hashable, frozen)
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        rates = ("flip_rate", "local_shuffle_rate", "nonlinear_rate", "invert_rate", "paint_rate", "inpaint_rate",
                 "paint_continue_rate")
        for key in rates:
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise ValueError(f"settings key {key!r} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("max_flips", "local_shuffle_blocks"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"settings key {key!r} must be >= 0, got {getattr(self, key)}")
        if int(self.bezier_samples) < 2:
            raise ValueError(f"settings key 'bezier_samples' must be >= 2, got {self.bezier_samples}")
        if int(self.paint_max_boxes) < 1:
            raise ValueError(f"settings key 'paint_max_boxes' must be >= 1, got {self.paint_max_boxes}")
        if not 0.0 < self.local_shuffle_max_fraction <= 1.0:
            raise ValueError(
                f"settings key 'local_shuffle_max_fraction' must lie in (0, 1], got {self.local_shuffle_max_fraction}"
            )
        if self.intensity not in INTENSITY_VARIANTS:
            raise ValueError(f"settings key 'intensity' must be one of {', '.join(INTENSITY_VARIANTS)}, "
                             f"got {self.intensity!r}")
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"settings key 'hu_window' must be [low, high] with low < high, got {self.hu_window}")
        if self.hu_std is not None and any(float(s) <= 0 for s in self.hu_std):
            raise ValueError(f"hu_std must be positive, got {self.hu_std}")


@dataclass
class GenesisSample:
    """A corrupted input, its restoration target, and what was done (for inspection and tests)."""

    corrupted: np.ndarray  # [C, Z, Y, X], the network's input
    target: np.ndarray  # [C, Z, Y, X], the original after the flips
    applied: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- intensity range
@dataclass(frozen=True)
class IntensityMap:
    """The per-channel affine map ``unit = (x - offset) / scale`` of one patch, optionally clipped to [0, 1].

    Example:
        >>> m = IntensityMap(offset=np.full((1, 1, 1, 1), -1.0), scale=np.full((1, 1, 1, 1), 2.0), clip=True)
        >>> m.to_unit(np.array([[[[-3.0, -1.0, 0.0, 1.0, 2.0]]]])).ravel().tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
        >>> m.from_unit(np.array([[[[0.0, 0.5, 1.0]]]])).ravel().tolist()
        [-1.0, 0.0, 1.0]
    """

    offset: np.ndarray  # [C, 1, 1, 1]
    scale: np.ndarray  # [C, 1, 1, 1], positive
    clip: bool = False

    def to_unit(self, image: np.ndarray) -> np.ndarray:
        unit = (image - self.offset) / self.scale
        return np.clip(unit, 0.0, 1.0) if self.clip else unit

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        return unit * self.scale + self.offset


def intensity_map(image: np.ndarray, params: GenesisParams) -> IntensityMap:
    """The map of ``params.intensity`` for the patch ``image [C, Z, Y, X]`` (see the module docstring).

    Example:
        >>> x = np.array([[[[-2.0, 0.0, 2.0]]]])
        >>> intensity_map(x, GenesisParams(intensity="patch_minmax")).to_unit(x).ravel().tolist()
        [0.0, 0.5, 1.0]
        >>> hu = GenesisParams(intensity="hu_window", hu_mean=(0.0,), hu_std=(500.0,))  # z 2 = 1000 HU
        >>> intensity_map(x, hu).to_unit(x).ravel().tolist()
        [0.0, 0.5, 1.0]
    """
    channels = image.shape[0]
    if params.intensity == "zscore":
        ones = np.ones((channels, 1, 1, 1), dtype=np.float64)
        return IntensityMap(offset=0.0 * ones, scale=ones)
    if params.intensity == "patch_minmax":
        _, low, scale = to_unit_range(image)
        return IntensityMap(offset=low, scale=scale)
    if params.intensity == "hu_window":
        if params.hu_mean is None or params.hu_std is None:
            raise ValueError("intensity 'hu_window' needs the corpus's CT z-score (hu_mean, hu_std): HU cannot be "
                             "recovered from a patch without them")
        if len(params.hu_mean) != channels or len(params.hu_std) != channels:
            raise ValueError(f"hu_mean / hu_std give {len(params.hu_mean)} / {len(params.hu_std)} channel(s), "
                             f"the patch has {channels}")
        mean = np.asarray(params.hu_mean, dtype=np.float64).reshape(-1, 1, 1, 1)
        std = np.asarray(params.hu_std, dtype=np.float64).reshape(-1, 1, 1, 1)
        low, high = params.hu_window
        return IntensityMap(offset=(low - mean) / std, scale=(high - low) / std, clip=True)
    raise ValueError(f"settings key 'intensity' must be one of {', '.join(INTENSITY_VARIANTS)}, "
                     f"got {params.intensity!r}")


def to_unit_range(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each channel to [0, 1] by its min and max; returns ``(unit, low, scale)`` for the way back.

    Example:
        >>> unit, low, scale = to_unit_range(np.array([[[[-2.0, 0.0, 2.0]]]]))
        >>> unit.ravel().tolist(), low.ravel().tolist(), scale.ravel().tolist()
        ([0.0, 0.5, 1.0], [-2.0], [4.0])
    """
    flat = image.reshape(image.shape[0], -1)  # [C, voxels]
    low = flat.min(axis=1).reshape(-1, 1, 1, 1)
    scale = flat.max(axis=1).reshape(-1, 1, 1, 1) - low
    scale = np.where(scale > 0, scale, 1.0)  # a constant channel: nothing to stretch
    return (image - low) / scale, low, scale


def from_unit_range(unit: np.ndarray, low: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_unit_range`.

    Example:
        >>> x = np.array([[[[-2.0, 0.0, 2.0]]]])
        >>> np.allclose(from_unit_range(*to_unit_range(x)), x)
        True
    """
    return unit * scale + low


# --------------------------------------------------------------------------------------------- flips
def random_flip_axes(rng: np.random.Generator, rate: float = FLIP_RATE, max_flips: int = MAX_FLIPS) -> list[int]:
    """Spatial axes (0 = Z, 1 = Y, 2 = X) to mirror: one more while a draw is below ``rate``, at most ``max_flips``.

    Example:
        >>> random_flip_axes(np.random.default_rng(0), rate=0.0)
        []
    """
    axes: list[int] = []
    while len(axes) < max_flips and rng.random() < rate:
        axes.append(int(rng.integers(3)))
    return axes


def flip(image: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Mirror ``image [C, Z, Y, X]`` along each spatial axis in ``axes`` in turn (an axis twice cancels).

    Example:
        >>> flip(np.arange(3.0).reshape(1, 3, 1, 1), [0]).ravel().tolist()
        [2.0, 1.0, 0.0]
    """
    out = image
    for axis in axes:
        if axis not in (0, 1, 2):
            raise ValueError(f"flip axis must be 0, 1 or 2 (a spatial axis), got {axis}")
        out = np.flip(out, axis=axis + 1)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------- local shuffling
def local_pixel_shuffle(
    image: np.ndarray,
    rng: np.random.Generator,
    num_blocks: int = LOCAL_SHUFFLE_BLOCKS,
    max_fraction: float = LOCAL_SHUFFLE_MAX_FRACTION,
) -> tuple[np.ndarray, list[Box]]:
    """Permute the voxels inside ``num_blocks`` random small boxes, one box after the other.

    A box has 1 to ``max(1, int(max_fraction * edge))`` voxels per axis; all channels of a voxel move
    together. Each step permutes the current content of its box, so every box keeps its multiset of
    voxels at its own step, the union of the boxes keeps its multiset overall, and voxels outside every box
    are untouched. Returns the shuffled copy and the boxes in order.

    Example:
        >>> x = np.arange(64.0).reshape(1, 4, 4, 4)
        >>> out, boxes = local_pixel_shuffle(x, np.random.default_rng(0), num_blocks=3, max_fraction=0.5)
        >>> sorted(out.ravel().tolist()) == x.ravel().tolist(), len(boxes)
        (True, 3)
    """
    out = image.copy()
    channels, spatial = image.shape[0], np.asarray(image.shape[1:])
    max_edges = np.maximum(1, (max_fraction * spatial).astype(int))
    num_blocks = int(num_blocks)
    # every box drawn up front (one vectorised call each), so the loop below only permutes
    sizes = rng.integers(1, max_edges + 1, size=(num_blocks, 3))  # [blocks, 3]
    starts = rng.integers(0, spatial - sizes + 1, size=(num_blocks, 3))  # [blocks, 3]
    stops = starts + sizes
    boxes: list[Box] = []
    for start, stop, size in zip(starts.tolist(), stops.tolist(), sizes.tolist()):
        window = (slice(None), slice(start[0], stop[0]), slice(start[1], stop[1]), slice(start[2], stop[2]))
        content = out[window].reshape(channels, -1)  # [C, voxels of the box]
        order = rng.permutation(content.shape[1])  # one order for all channels: a voxel moves as a whole
        out[window] = content[:, order].reshape(channels, *size)
        boxes.append((tuple(start), tuple(stop)))  # type: ignore[arg-type]
    return out, boxes


# --------------------------------------------------------------------------------------------- intensity curve
def bezier_points(control_points: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Points ``[len(t), 2]`` of the Bezier curve with ``control_points [n, 2]`` (Bernstein form).

    Example:
        >>> p = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> bezier_points(p, np.array([0.5])).tolist()  # (P0 + 2 P1 + P2) / 4
        [[0.25, 0.75]]
    """
    degree = len(control_points) - 1
    t = np.asarray(t, dtype=np.float64)[:, None]  # [T, 1]
    weights = np.concatenate(
        [comb(degree, i) * t**i * (1.0 - t) ** (degree - i) for i in range(degree + 1)], axis=1
    )  # [T, n]
    return weights @ np.asarray(control_points, dtype=np.float64)


def random_intensity_curve(
    rng: np.random.Generator, invert_rate: float = INVERT_RATE, num_samples: int = BEZIER_SAMPLES
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A random monotone curve on [0, 1] as an interpolation table ``(xs, ys, inverted)``.

    The cubic Bezier curve from (0, 0) to (1, 1) with two control points uniform in the unit square stays in
    the square (convex hull). Its x and y samples are each sorted, which makes the table an increasing map of
    [0, 1] onto [0, 1] with fixed endpoints even where the curve itself turns back. With probability
    ``invert_rate`` the y values run backwards: a decreasing map with 0 -> 1 and 1 -> 0 (the original's
    "sort only x" variant, which inverts intensities).

    Example:
        >>> xs, ys, inverted = random_intensity_curve(np.random.default_rng(0), invert_rate=0.0, num_samples=11)
        >>> [float(v) for v in (xs[0], xs[-1], ys[0], ys[-1])], inverted
        ([0.0, 1.0, 0.0, 1.0], False)
    """
    inner = rng.random((2, 2))  # two control points in the unit square
    control = np.concatenate([[[0.0, 0.0]], inner, [[1.0, 1.0]]])  # [4, 2]
    points = bezier_points(control, np.linspace(0.0, 1.0, int(num_samples)))
    xs, ys = np.sort(points[:, 0]), np.sort(points[:, 1])
    inverted = bool(rng.random() < invert_rate)
    return xs, (ys[::-1].copy() if inverted else ys), inverted


def apply_intensity_curve(unit_image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Map every voxel (in [0, 1]) through the table ``(xs, ys)`` by linear interpolation.

    Example:
        >>> apply_intensity_curve(np.array([0.25]), np.array([0.0, 1.0]), np.array([1.0, 0.0])).tolist()
        [0.75]
    """
    return np.interp(unit_image, xs, ys).astype(unit_image.dtype, copy=False)


# --------------------------------------------------------------------------------------------- painting
def _random_box(rng: np.random.Generator, spatial: Sequence[int], sizes: Sequence[int]) -> Box:
    """A box of ``sizes`` placed uniformly, ``PAINT_MARGIN`` voxels from the border where the patch allows."""
    starts = []
    for edge, size in zip(spatial, sizes):
        margin = min(PAINT_MARGIN, (edge - size) // 2)
        starts.append(int(rng.integers(margin, edge - size - margin + 1)))
    return tuple(starts), tuple(s + n for s, n in zip(starts, sizes))  # type: ignore[return-value]


def _box_count(rng: np.random.Generator, max_boxes: int, continue_rate: float, first_always: bool) -> int:
    """Boxes to draw: each with probability ``continue_rate``, at most ``max_boxes``; the original draws the
    first out-painting box always and the first in-painting box like the others."""
    count = 1 if first_always else 0
    while count < max_boxes and rng.random() < continue_rate:
        count += 1
    return count


def _window(box: Box) -> tuple[slice, ...]:
    return (slice(None),) + tuple(slice(a, b) for a, b in zip(*box))


def in_paint(
    unit_image: np.ndarray,
    rng: np.random.Generator,
    max_boxes: int = PAINT_MAX_BOXES,
    continue_rate: float = PAINT_CONTINUE_RATE,
) -> tuple[np.ndarray, list[Box]]:
    """Replace random boxes (edges 1/6 to 1/3 of the patch's) by uniform noise in [0, 1].

    Up to ``max_boxes`` boxes, each drawn with probability ``continue_rate`` (so possibly none, as in the
    original). Voxels outside the returned boxes are unchanged.

    Example:
        >>> out, boxes = in_paint(np.zeros((1, 24, 24, 24)), np.random.default_rng(0), max_boxes=1,
        ...                       continue_rate=1.0)
        >>> (a, b), = boxes
        >>> bool((out[0, a[0]:b[0], a[1]:b[1], a[2]:b[2]] > 0).all()), float(out.sum()) > 0
        (True, True)
    """
    out = unit_image.copy()
    spatial = unit_image.shape[1:]
    boxes: list[Box] = []
    for _ in range(_box_count(rng, max_boxes, continue_rate, first_always=False)):
        low, high = INPAINT_SIZE_FRACTION
        sizes = [int(rng.integers(max(1, int(low * e)), max(1, int(high * e)) + 1)) for e in spatial]
        box = _random_box(rng, spatial, sizes)
        window = _window(box)
        out[window] = rng.random(out[window].shape).astype(out.dtype, copy=False)
        boxes.append(box)
    return out, boxes


def out_paint(
    unit_image: np.ndarray,
    rng: np.random.Generator,
    max_boxes: int = PAINT_MAX_BOXES,
    continue_rate: float = PAINT_CONTINUE_RATE,
) -> tuple[np.ndarray, list[Box]]:
    """Replace everything by uniform noise in [0, 1] except random boxes (edges 3/7 to 4/7 of the patch's),
    which keep the image.

    Example:
        >>> x = np.full((1, 24, 24, 24), 2.0)
        >>> out, boxes = out_paint(x, np.random.default_rng(0), max_boxes=1)
        >>> (a, b), = boxes
        >>> bool((out[0, a[0]:b[0], a[1]:b[1], a[2]:b[2]] == 2.0).all()), float(out.min()) < 1.0
        (True, True)
    """
    out = rng.random(unit_image.shape).astype(unit_image.dtype, copy=False)
    spatial = unit_image.shape[1:]
    boxes: list[Box] = []
    for _ in range(_box_count(rng, max_boxes, continue_rate, first_always=True)):
        low, high = OUTPAINT_CUT_FRACTION
        sizes = [max(1, e - int(rng.integers(int(low * e), int(high * e) + 1))) for e in spatial]
        box = _random_box(rng, spatial, sizes)
        window = _window(box)
        out[window] = unit_image[window]
        boxes.append(box)
    return out, boxes


# --------------------------------------------------------------------------------------------- the whole pair
def genesis_pair(image: np.ndarray, rng: np.random.Generator, params: GenesisParams | None = None) -> GenesisSample:
    """Corrupt one z-scored patch ``[C, Z, Y, X]`` the Models Genesis way, on the intensity scale of
    ``params.intensity``; see the module docstring.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
        >>> s = genesis_pair(x, np.random.default_rng(3), GenesisParams(local_shuffle_blocks=50))
        >>> s.corrupted.dtype, sorted(s.applied)
        (dtype('float32'), ['flip_axes', 'inverted', 'local_shuffle', 'nonlinear', 'painting'])
    """
    params = params or GenesisParams()
    if image.ndim != 4:
        raise ValueError(f"genesis_pair expects a [C, Z, Y, X] patch, got shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    applied: dict[str, Any] = {}
    applied["flip_axes"] = random_flip_axes(rng, params.flip_rate, params.max_flips)
    target = flip(image, applied["flip_axes"])
    mapping = intensity_map(target, params)
    if mapping.clip:  # hu_window: the target is the windowed patch (clipped in z units, exact inside the window),
        # so an uncorrupted input equals it
        target = np.clip(target, mapping.offset, mapping.offset + mapping.scale).astype(np.float32)
    corrupted = mapping.to_unit(target).astype(np.float32)

    applied["local_shuffle"] = bool(rng.random() < params.local_shuffle_rate)
    if applied["local_shuffle"]:
        corrupted, _ = local_pixel_shuffle(
            corrupted, rng, params.local_shuffle_blocks, params.local_shuffle_max_fraction
        )

    applied["nonlinear"] = bool(rng.random() < params.nonlinear_rate)
    applied["inverted"] = False
    if applied["nonlinear"]:
        xs, ys, applied["inverted"] = random_intensity_curve(rng, params.invert_rate, params.bezier_samples)
        corrupted = apply_intensity_curve(corrupted, xs, ys)

    applied["painting"] = None
    if rng.random() < params.paint_rate:
        if rng.random() < params.inpaint_rate:
            applied["painting"] = "in"
            corrupted, _ = in_paint(corrupted, rng, params.paint_max_boxes, params.paint_continue_rate)
        else:
            applied["painting"] = "out"
            corrupted, _ = out_paint(corrupted, rng, params.paint_max_boxes, params.paint_continue_rate)

    corrupted = mapping.from_unit(corrupted).astype(np.float32)
    return GenesisSample(corrupted=corrupted, target=target, applied=applied)
