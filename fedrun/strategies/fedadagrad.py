"""FedAdagrad: Adagrad's accumulated second moment on the server."""

from __future__ import annotations

import torch

from fedrun.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """FedOpt with v = v + delta^2; server.beta2 is not used.

    Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush,
    Jakub Konecny, Sanjiv Kumar, H. Brendan McMahan (2021), "Adaptive Federated
    Optimization", ICLR 2021. The shared step and its settings are in `FedOpt`; the
    paper keeps the b1 momentum on m for FedAdagrad too (server.beta1=0 drops it).
    """

    name = "fedadagrad"
    uses_beta2 = False

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
