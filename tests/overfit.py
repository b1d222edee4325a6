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
