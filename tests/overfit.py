"""Shared overfit check of the detector tests: fit two cases, then score the model's own predictions on them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pretrain_det3d.evaluation import evaluate_cases
from pretrain_det3d.evaluation.run import CaseBoxes


def fit_and_score(model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                  seg: torch.Tensor | None, steps: int = 40, clip: float = 12.0) -> tuple[float, float, dict[str, Any]]:
    """AdamW (lr 2e-3) for ``steps`` on the batch; returns the first and last loss and the metrics of
    ``model.predict`` on the same cases (classes 0 and 1)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.compute_losses(images, targets, seg)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    predictions = model.predict(images)
    ground_truth = [CaseBoxes(t["boxes"].numpy().astype(np.float64), t["labels"].numpy()) for t in targets]
    predicted = [CaseBoxes(p["boxes"].numpy().astype(np.float64), p["labels"].numpy(), p["scores"].numpy())
                 for p in predictions]
    metrics, _ = evaluate_cases([f"case_{i}" for i in range(len(targets))], ground_truth, predicted, [0, 1])
    return losses[0], losses[-1], metrics


def two_overfit_cases(size: int = 32) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], torch.Tensor]:
    """Two noisy volumes with bright cuboid lesions (class 1 brighter than class 0): images ``[2, 1, S, S, S]``,
    targets (boxes, labels) and the foreground segmentation, shared by the detectors' overfit tests."""
    targets = [
        {"boxes": torch.tensor([[4.0, 6, 5, 12, 13, 11], [18, 16, 20, 26, 27, 27]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 3, 14, 20, 10, 22]]), "labels": torch.tensor([1])},
    ]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, size, size, size, generator=g) * 0.3
    seg = torch.zeros(2, 1, size, size, size, dtype=torch.long)
    for index, target in enumerate(targets):
        for box, label in zip(target["boxes"].long(), target["labels"]):
            region = (index, 0, slice(box[0], box[3]), slice(box[1], box[4]), slice(box[2], box[5]))
            images[region] += 1.0 + float(label)
            seg[region] = 1
    return images, targets, seg
