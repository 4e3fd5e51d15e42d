"""Coordinate-wise median of the devices' weights."""

from __future__ import annotations

import torch

from fedrun.strategies.base import Update, stack
from fedrun.strategies.robust import RobustStrategy


class Median(RobustStrategy):
    """Each coordinate of the new model is the median of that coordinate over updates.

    Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett (2018), "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.

    Unweighted: sample counts are ignored (see `RobustStrategy`). With an even number of
    updates the median is the mean of the two middle values. A round needs 2f + 1
    updates, so that in every coordinate the f bad values are a minority and the median
    lies between two honest values.
    """

    name = "median"

    def _needed(self, f: int) -> int:
        return 2 * f + 1

    def _rule(self) -> tuple[str, str]:
        return "2f+1", "the honest values must be a majority in each coordinate"

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        # Sorting copies all n updates once; msort returns values only, no indices.
        ordered = torch.msort(stack(updates))
        n = ordered.shape[0]
        if n % 2 == 1:
            # clone(): a row view would keep the whole (n, P) block alive.
            return ordered[n // 2].clone()
        low = ordered[n // 2 - 1].to(torch.float64)
        return ((low + ordered[n // 2]) / 2).to(global_weights.dtype)
