"""Metrics, torchmetrics-style: accumulate with ``update()``, finish with ``compute()``, mergeable across processes."""

from __future__ import annotations

from typing import Iterable

import torch
from torchmetrics import Metric


class ConceptRate(Metric):
    """Fraction of images in which a judge sees what it is asked about.

    ``update(hits, empty)`` takes per-image booleans: ``hits`` — the judged thing is present; ``empty`` — the judge
    sees no object at all (reported with every rate: a broken model that paints nothing has a low concept rate too).
    ``compute()`` → ``{"rate": …, "none_rate": …, "n": …}``.
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("empty", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, hits: Iterable[bool], empty: Iterable[bool] | None = None) -> None:
        hits = torch.as_tensor(list(hits), dtype=torch.bool)
        self.hits += int(hits.sum())
        self.total += hits.numel()
        if empty is not None:
            self.empty += int(torch.as_tensor(list(empty), dtype=torch.bool).sum())

    def compute(self) -> dict:
        n = int(self.total)
        return {"rate": float(self.hits) / max(n, 1), "none_rate": float(self.empty) / max(n, 1), "n": n}
