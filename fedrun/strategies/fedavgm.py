"""FedAvgM: FedAvg with momentum applied on the server."""

from __future__ import annotations

from typing import Any

import torch

from fedrun.config import ServerConfig
from fedrun.strategies.base import (
    Strategy,
    Update,
    load_tensor,
    match_state,
    require_param,
    weighted_mean,
)


class FedAvgM(Strategy):
    """Server momentum on the FedAvg pseudo-gradient.

    Tzu-Ming Harry Hsu, Hang Qi, Matthew Brown (2019), "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification",
    arXiv:1909.06335.

    Each round: d = global - fedavg(updates); v = beta * v + d; new = global - lr * v,
    with beta = server.server_momentum and lr = server.server_lr (1.0 when 0, which
    with beta = 0 is plain FedAvg). The velocity v starts at zero and is part of
    `state_dict`, so a resumed run continues with the same momentum.
    """

    name = "fedavgm"

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.beta = cfg.server_momentum
        self.lr = cfg.server_lr or 1.0
        self.velocity: torch.Tensor | None = None

    def check(self, num_devices: int) -> None:
        super().check(num_devices)
        require_param(0 <= self.beta < 1, "server.server_momentum", self.beta,
                      "in [0, 1); 0 turns FedAvgM into FedAvg with a server rate")

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        # The difference is taken in float64: d is small next to the weights, and
        # rounding both to float32 first would lose its low bits.
        d = (global_weights.to(torch.float64) - weighted_mean(updates))
        d = d.to(global_weights.dtype)
        if self.velocity is None:
            velocity = d
        else:
            velocity = self.beta * match_state(
                self.velocity, global_weights, "velocity", self.name) + d
        self.velocity = velocity
        return global_weights - self.lr * velocity

    def state_dict(self) -> dict[str, Any]:
        # Safe to hand out without a copy: rounds replace the velocity, never edit it.
        state = super().state_dict()
        if self.velocity is not None:
            state["velocity"] = self.velocity
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.velocity = load_tensor(state, "velocity", self.name)
