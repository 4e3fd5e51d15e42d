"""The shared step of the adaptive server optimisers FedAdam, FedYogi and FedAdagrad."""

from __future__ import annotations

from typing import Any

import torch

from fedrun.config import ServerConfig
from fedrun.strategies.base import (
    Strategy,
    StrategyError,
    Update,
    load_tensor,
    match_state,
    require_param,
    weighted_mean,
)


class FedOpt(Strategy):
    """An adaptive optimiser on the server, driven by the FedAvg pseudo-gradient.

    Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush,
    Jakub Konecny, Sanjiv Kumar, H. Brendan McMahan (2021), "Adaptive Federated
    Optimization", ICLR 2021 (Algorithm 2).

    Each round: delta = fedavg(updates) - global; m = b1 * m + (1 - b1) * delta;
    v follows the subclass's rule; new = global + lr * m / (sqrt(v) + tau).
    b1 = server.beta1, b2 = server.beta2, tau = server.tau, lr = server.server_lr
    (0.01 when 0). As in the paper, m starts at 0, v at tau^2, and there is no bias
    correction. m and v are part of `state_dict`.
    """

    uses_beta2 = True

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.beta1 = cfg.beta1
        self.beta2 = cfg.beta2
        self.tau = cfg.tau
        self.lr = cfg.server_lr or 0.01
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def check(self, num_devices: int) -> None:
        super().check(num_devices)
        require_param(0 <= self.beta1 < 1, "server.beta1", self.beta1, "in [0, 1)")
        if self.uses_beta2:
            require_param(0 <= self.beta2 < 1, "server.beta2", self.beta2, "in [0, 1)")
        require_param(self.tau > 0, "server.tau", self.tau,
                      "a positive adaptivity constant, for example server.tau=0.001")

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        # float64 difference: delta is small next to the weights (see FedAvgM).
        delta = weighted_mean(updates) - global_weights.to(torch.float64)
        delta = delta.to(global_weights.dtype)
        if self.m is None or self.v is None:
            m = torch.zeros_like(global_weights)
            v = torch.full_like(global_weights, self.tau**2)
        else:
            m = match_state(self.m, global_weights, "m", self.name)
            v = match_state(self.v, global_weights, "v", self.name)

        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self._second_moment(v, delta.square())

        self.m, self.v = m, v
        return global_weights + self.lr * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        # No copies needed: each round replaces m and v rather than editing them.
        state = super().state_dict()
        if self.m is not None and self.v is not None:
            state["m"], state["v"] = self.m, self.v
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.m = load_tensor(state, "m", self.name)
        self.v = load_tensor(state, "v", self.name)
        if (self.m is None) != (self.v is None):
            raise StrategyError(f"the saved {self.name} state holds only one of m, v")
