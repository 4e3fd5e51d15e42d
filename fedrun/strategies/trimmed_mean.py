"""Coordinate-wise trimmed mean of the devices' weights."""

from __future__ import annotations

import math

import torch

from fedrun.config import ServerConfig
from fedrun.strategies.base import Update, stack
from fedrun.strategies.robust import RobustStrategy


class TrimmedMean(RobustStrategy):
    """Per coordinate, drop the k largest and k smallest values and average the rest.

    Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett (2018), "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.

    Unweighted: sample counts are ignored (see `RobustStrategy`). With n updates and
    t = server.trim_fraction, the cut from each end is k = max(floor(t * n), f),
    f = server.byzantine: the fraction sets the cut, and it is never smaller than the
    number of bad devices assumed. So when floor(t * n) rounds to 0 (say t = 0.2 with
    4 updates), k is f; only with f = 0 as well does k become 0 and the result the
    plain unweighted mean. A round needs 2f + 1 updates, so that one value is left.
    """

    name = "trimmed_mean"

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.fraction = cfg.trim_fraction

    def _needed(self, f: int) -> int:
        return 2 * f + 1

    def _rule(self) -> tuple[str, str]:
        return "2f+1", "a value must be left after cutting f from each end"

    def cut(self, n: int) -> int:
        """How many values are dropped from each end of a coordinate with n updates."""
        # The 1e-9 keeps 0.29 * 100 = 28.999999999999996 from flooring to 28.
        k = max(math.floor(self.fraction * n + 1e-9), self.f)
        return min(k, (n - 1) // 2)

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        n = len(updates)
        k = self.cut(n)
        # Sorting copies all n updates once; msort returns values only, no indices.
        kept = torch.msort(stack(updates))[k : n - k]
        return (kept.sum(dim=0, dtype=torch.float64) / (n - 2 * k)).to(
            global_weights.dtype
        )
