"""Krum: the one update closest to its nearest neighbours."""

from __future__ import annotations

import math

import torch

from fedrun.config import ServerConfig
from fedrun.strategies.base import Update, by_rank
from fedrun.strategies.robust import RobustStrategy


def krum_scores(updates: list[Update], f: int) -> list[float]:
    """Each update's Krum score: the summed squared L2 distances to its n - f - 2
    nearest other updates. `updates` must be in rank order; scores follow that order.

    The n(n-1)/2 distances cost one pass over two updates each, in float64 so that
    close updates are still told apart; they reach the host in one transfer.
    """
    n = len(updates)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    norms = [
        torch.linalg.vector_norm(updates[i].weights - updates[j].weights,
                                 dtype=torch.float64)
        for i, j in pairs
    ]
    dist = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), d in zip(pairs, torch.stack(norms).square().cpu().tolist()):
        dist[i, j] = dist[j, i] = d

    neighbours = n - f - 2
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        score = torch.sort(others).values[:neighbours].sum().item()
        # A nan score (an update holding nan) would make the ordering in `best`
        # arbitrary; inf ranks it last instead.
        scores.append(score if math.isfinite(score) else math.inf)
    return scores


def best(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` lowest scores; ties go to the lower rank."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]


class Krum(RobustStrategy):
    """The new global model is the single update with the lowest Krum score.

    Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer (2017),
    "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017.

    With n updates and f = server.byzantine, an update's score is the sum of squared
    distances to its n - f - 2 nearest neighbours; the paper's guarantee needs
    n > 2f + 2, so a round needs 2f + 3 updates. Unweighted: sample counts are ignored
    (see `RobustStrategy`). Ties go to the lowest rank. The ranks chosen in the last
    round are in `last_selected`, for the server's log.
    """

    name = "krum"

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.last_selected: list[int] = []

    def _needed(self, f: int) -> int:
        return 2 * f + 3

    def _rule(self) -> tuple[str, str]:
        return "2f+3", "Krum's guarantee needs n > 2f+2"

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        ordered = by_rank(updates)
        chosen = ordered[best(krum_scores(ordered, self.f), 1)[0]]
        self.last_selected = [chosen.rank]
        return chosen.weights.clone()
