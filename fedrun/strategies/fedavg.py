"""FedAvg: the sample-weighted mean of the devices' weights."""

from __future__ import annotations

import torch

from fedrun.strategies.base import Strategy, Update, weighted_mean


class FedAvg(Strategy):
    """Federated averaging.

    H. Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson, Blaise Aguera y Arcas
    (2017), "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017.

    The new global model is sum_k n_k w_k / sum_k n_k over the round's updates, with n_k
    the samples device k trained on. The previous global model does not enter the mean.
    A single device that reports a huge sample count or huge weights moves the result as
    far as it likes; choose a robust strategy when that matters.
    """

    name = "fedavg"

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        return weighted_mean(updates).to(global_weights.dtype)
