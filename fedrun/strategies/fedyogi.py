"""FedYogi: Yogi's additive second-moment rule on the server."""

from __future__ import annotations

import torch

from fedrun.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """FedOpt with v = v - (1 - b2) * delta^2 * sign(v - delta^2).

    Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush,
    Jakub Konecny, Sanjiv Kumar, H. Brendan McMahan (2021), "Adaptive Federated
    Optimization", ICLR 2021. The shared step and its settings are in `FedOpt`.

    Unlike Adam, v moves towards delta^2 by at most (1 - b2) * delta^2 a round, so a
    single large pseudo-gradient does not blow the effective rate down at once. v stays
    positive: where it shrinks, it loses (1 - b2) * delta^2 < delta^2 < v.
    """

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)
