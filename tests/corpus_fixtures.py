"""Small unlabelled corpora in the preprocessed format (``cases/{case}.npy``, ``[1, Z, Y, X]`` float32, z-scored),
shared by the pre-training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from pretrain_det3d.data.synthetic import make_phantom


def _save_zscored(root: Path, index: int, volume: np.ndarray) -> None:
    volume = (volume - volume.mean()) / volume.std()
    np.save(root / "cases" / f"vol_{index:03d}.npy", volume[None].astype(np.float32))


def write_blob_corpus(root: Path, num_cases: int = 3, shape: Sequence[int] = (40, 40, 40)) -> None:
    """Smoothed noise: structure a network can learn to fill in. Cases ``vol_000``, ``vol_001``, ..."""
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    for index in range(num_cases):
        _save_zscored(root, index, ndimage.gaussian_filter(rng.normal(size=tuple(shape)), sigma=2.5))


def write_phantom_corpus(root: Path, num_cases: int = 3, shape: Sequence[int] = (40, 40, 40)) -> None:
    """Phantoms of the synthetic corpus (body, organs, lesions). Cases ``vol_000``, ``vol_001``, ..."""
    (root / "cases").mkdir(parents=True)
    for index in range(num_cases):
        phantom = make_phantom({"shape": list(shape), "spacing": [1.0, 1.0, 1.0]}, np.random.default_rng(index))
        _save_zscored(root, index, phantom.image.astype(np.float32))
