"""FedProx: FedAvg on the server, a proximal term in each device's loss."""

from __future__ import annotations

import torch
from torch import nn

from fedrun.config import ServerConfig
from fedrun.strategies.base import require_param
from fedrun.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg aggregation for devices that train with a proximal term.

    Tian Li, Anit Kumar Sahu, Manzil Zaheer, Maziar Sanjabi, Ameet Talwalkar, Virginia
    Smith (2020), "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    The server side is the sample-weighted mean of FedAvg. What differs is on the
    device: its loss adds mu/2 * ||w - w_global||^2 (see `proximal_term`), which keeps
    local training near the round's global model when the devices' data differ;
    mu = server.proximal_mu.
    """

    name = "fedprox"

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.mu = cfg.proximal_mu

    def check(self, num_devices: int) -> None:
        super().check(num_devices)
        require_param(self.mu >= 0, "server.proximal_mu", self.mu,
                      "0 (plain FedAvg training) or a positive weight")


def proximal_term(
    model: nn.Module, global_params: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """mu/2 * sum over parameters of ||p - p_global||^2, to add to the device's loss.

    `global_params` are the round's global values of `model.parameters()`, in that
    order (buffers are not part of it). They are treated as constants: no gradient
    flows into them. The result is a 0-d tensor on the parameters' device, connected to
    the graph so that its gradient w.r.t. p is mu * (p - p_global).
    """
    params = list(model.parameters())
    if len(params) != len(global_params):
        raise ValueError(
            f"the model has {len(params)} parameter tensors but {len(global_params)} "
            "global ones were given; pass them in the order of model.parameters()"
        )
    if mu < 0:
        raise ValueError(f"mu = {mu} is negative; the proximal weight must be >= 0")
    if not params:
        return torch.zeros(())
    total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for p, g in zip(params, global_params):
        if p.shape != g.shape:
            raise ValueError(f"a global parameter has shape {tuple(g.shape)}, the "
                             f"model's {tuple(p.shape)}")
        total = total + (p - g.detach().to(p.device, p.dtype)).square().sum()
    return 0.5 * mu * total
