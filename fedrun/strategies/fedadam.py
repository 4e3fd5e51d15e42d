"""FedAdam: Adam's second-moment rule on the server."""

from __future__ import annotations

import torch

from fedrun.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """FedOpt with v = b2 * v + (1 - b2) * delta^2.

    Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush,
    Jakub Konecny, Sanjiv Kumar, H. Brendan McMahan (2021), "Adaptive Federated
    Optimization", ICLR 2021. The shared step and its settings are in `FedOpt`.
    """

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq
