"""AP-by-initialisation figure: files written atomically, PNG size as planned, one style per initialisation."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.analysis.figures import (
    PNG_DPI,
    figure_size,
    initialisation_order,
    initialisation_palette,
    initialisation_style,
    plot_ap_by_init,
)

AP = "AP_IoU_0.10_MaxDet_100"


def write_runs(path: Path, detectors: list[str], inits: list[str], datasets: list[str], folds: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [
        dict(detector=d, initialisation=i, dataset=s, fold=f, metric=metric, value=float(rng.uniform(0.2, 0.9)))
        for d in detectors for i in inits for s in datasets for f in range(folds) for metric in (AP, "num_cases")
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("detectors,datasets", [(["retina_unet"], ["demo"]),
                                                (["retina_unet", "deformable_detr"], ["a", "b", "c"])])
def test_png_and_pdf_are_written_with_the_planned_size(tmp_path: Path, detectors, datasets) -> None:
    runs = write_runs(tmp_path / "runs.csv", detectors, ["scratch", "mae", "my_checkpoint"], datasets, folds=3)
    png, pdf = tmp_path / "fig" / "ap.png", tmp_path / "fig" / "ap.pdf"
    plot_ap_by_init(runs, png, pdf)
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    image = mpimg.imread(png)
    width, height = figure_size(len(detectors), len(datasets))
    assert image.shape[:2] == (round(height * PNG_DPI), round(width * PNG_DPI))
    assert image[..., :3].std() > 0.05  # something is drawn
    assert sorted(p.name for p in png.parent.iterdir()) == ["ap.pdf", "ap.png"]  # no temporary files left


def test_styles_are_fixed_distinct_and_shared() -> None:
    names = ["scratch", "mae", "spark3d", "models_genesis", "voco", "multitalent"]
    styles = [initialisation_style(n) for n in names]
    assert len({s.colour for s in styles}) == len({s.hatch for s in styles}) == len({s.marker for s in styles}) == 6
    assert initialisation_palette(["mae", "unknown_ckpt"]) == {
        "mae": initialisation_style("mae").colour, "unknown_ckpt": initialisation_style("unknown_ckpt").colour}
    assert initialisation_order(["voco", "b_ckpt", "a_ckpt", "scratch"]) == ["scratch", "voco", "a_ckpt", "b_ckpt"]


def test_bad_runs_table_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        plot_ap_by_init(tmp_path / "absent.csv", tmp_path / "a.png", tmp_path / "a.pdf")
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"detector": ["d"], "value": [0.1]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad\.csv: per-run table: missing column"):
        plot_ap_by_init(bad, tmp_path / "a.png", tmp_path / "a.pdf")
    assert not (tmp_path / "a.png").exists()
