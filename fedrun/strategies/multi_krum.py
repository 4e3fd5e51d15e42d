"""Multi-Krum: the mean of the updates with the best Krum scores."""

from __future__ import annotations

import torch

from fedrun.config import ServerConfig
from fedrun.strategies.base import Update, by_rank, require_param
from fedrun.strategies.krum import Krum, best, krum_scores


class MultiKrum(Krum):
    """Average the m updates with the lowest Krum scores.

    Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer (2017),
    "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017 (the Multi-Krum variant).

    m = server.multi_krum_keep, or n - f when it is 0; in a round with fewer updates
    than planned, m is capped at n - f so that the f assumed-bad devices cannot all be
    in the mean. Scores are computed once per round, as in the paper, not recomputed
    after each pick. The mean is unweighted (see `RobustStrategy`); m = 1 is Krum.
    """

    name = "multi_krum"

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.keep = cfg.multi_krum_keep

    def check(self, num_devices: int) -> None:
        super().check(num_devices)
        most = num_devices - self.f
        require_param(
            0 <= self.keep <= most, "server.multi_krum_keep", self.keep,
            f"0 (keep n - f) or between 1 and devices - server.byzantine ({most}), "
            "so that the mean never needs an assumed-bad update",
        )

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        ordered = by_rank(updates)
        most = len(ordered) - self.f
        m = min(self.keep, most) if self.keep > 0 else most
        chosen = [ordered[i] for i in best(krum_scores(ordered, self.f), m)]
        self.last_selected = [u.rank for u in chosen]
        acc = torch.zeros_like(global_weights, dtype=torch.float64)
        for u in chosen:
            acc.add_(u.weights.to(torch.float64))
        return (acc / m).to(global_weights.dtype)
