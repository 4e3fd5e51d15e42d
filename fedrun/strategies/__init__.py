"""Aggregation strategies: how the server turns a round's updates into a new model.

`build_strategy(cfg.server)` returns the strategy named by server.strategy. The
global model and every update are one flat 1-D float tensor; see `base` for the rules
all strategies keep, and each module's docstring for its paper.
"""

from __future__ import annotations

from fedrun.config import ConfigError, ServerConfig
from fedrun.strategies.base import Strategy, StrategyError, Update
from fedrun.strategies.fedadagrad import FedAdagrad
from fedrun.strategies.fedadam import FedAdam
from fedrun.strategies.fedavg import FedAvg
from fedrun.strategies.fedavgm import FedAvgM
from fedrun.strategies.fedprox import FedProx
from fedrun.strategies.fedyogi import FedYogi
from fedrun.strategies.krum import Krum
from fedrun.strategies.median import Median
from fedrun.strategies.multi_krum import MultiKrum
from fedrun.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
        Median, TrimmedMean, Krum, MultiKrum,
    )
}


def build_strategy(cfg: ServerConfig) -> Strategy:
    """The strategy named by server.strategy, set up from the [server] section."""
    cls = STRATEGIES.get(cfg.strategy)
    if cls is None:
        raise ConfigError(
            f"server.strategy = {cfg.strategy!r} is not known; choose one of "
            + ", ".join(STRATEGIES)
        )
    return cls(cfg)


__all__ = ["Strategy", "StrategyError", "Update", "build_strategy", "STRATEGIES"]
