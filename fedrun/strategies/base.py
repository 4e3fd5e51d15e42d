"""What every aggregation strategy shares: the update record, errors, the base class.

The server holds the global model as one flat 1-D float tensor (parameters and buffers
packed). After a round it has, for each usable device, an `Update`: that device's flat
weights after local training and the number of samples it trained on. A strategy turns
the global tensor and those updates into the next global tensor.

Rules every strategy keeps:
- `aggregate` never writes into its inputs; the result is a new tensor with the dtype
  and device of the global tensor.
- A round with fewer than `min_updates()` updates raises `StrategyError`; the server
  decides whether that round is skipped.
- `state_dict()` holds only tensors and plain Python values, so that it can be saved
  with `torch.save` and read back with `torch.load(weights_only=True)`; loading it into
  a fresh instance gives bit-identical aggregations from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedrun.config import ConfigError, ServerConfig


@dataclass
class Update:
    """One device's result of a round."""

    rank: int
    weights: torch.Tensor  # flat, same shape and dtype as the global tensor
    samples: int  # > 0


class StrategyError(RuntimeError):
    """A round the strategy cannot aggregate; the message says why."""


class Strategy:
    """Base class: checks the round's updates, then hands them to `_aggregate`."""

    name: str = ""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    def min_updates(self) -> int:
        """The fewest updates one round needs."""
        return 1

    def check(self, num_devices: int) -> None:
        """Reject, before any round, a setup in which this strategy never aggregates."""
        need = self.min_updates()
        if num_devices < need:
            raise ConfigError(
                f"server.strategy = {self.name!r} needs at least {need} updates a "
                f"round ({self._min_rule()}), but there are only {num_devices} "
                f"devices; {self._min_fix(num_devices)}"
            )

    def aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        """The next global tensor from this round's updates."""
        self._check_updates(global_weights, updates, server_round)
        return self._aggregate(global_weights, updates, server_round)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("name")
        if saved != self.name:
            raise StrategyError(
                f"the saved strategy state is for {saved!r}, but server.strategy is "
                f"{self.name!r}; resume with server.strategy={saved}"
            )

    # Subclasses override these.

    def _aggregate(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def _min_rule(self) -> str:
        return "at least one"

    def _min_fix(self, num_devices: int) -> str:
        return f"raise devices.count to {self.min_updates()}"

    def _check_updates(
        self, global_weights: torch.Tensor, updates: list[Update], server_round: int
    ) -> None:
        prefix = f"{self.name} round {server_round}"
        if global_weights.dim() != 1 or not global_weights.is_floating_point():
            raise StrategyError(
                f"{prefix}: the global weights must be one flat float tensor, got "
                f"shape {tuple(global_weights.shape)} of {global_weights.dtype}"
            )
        need = self.min_updates()
        if len(updates) < need:
            raise StrategyError(
                f"{prefix}: got {len(updates)} updates but {self.name} needs at least "
                f"{need} ({self._min_rule()})"
            )
        ranks = [u.rank for u in updates]
        if len(set(ranks)) != len(ranks):
            raise StrategyError(f"{prefix}: more than one update from a rank: {ranks}")
        for u in updates:
            if u.weights.shape != global_weights.shape or (
                u.weights.dtype != global_weights.dtype
            ):
                raise StrategyError(
                    f"{prefix}: the update of rank {u.rank} has shape "
                    f"{tuple(u.weights.shape)} of {u.weights.dtype}, the global model "
                    f"{tuple(global_weights.shape)} of {global_weights.dtype}"
                )
            if u.samples <= 0:
                raise StrategyError(
                    f"{prefix}: the update of rank {u.rank} reports {u.samples} "
                    "samples; an update needs at least one"
                )


def weighted_mean(updates: list[Update]) -> torch.Tensor:
    """The sample-weighted mean of the updates' weights, in float64.

    Summing in float64 costs one extra buffer of the model's size but keeps the mean
    independent of the order of the updates to well below float32 resolution.
    """
    total = sum(u.samples for u in updates)
    acc = torch.zeros_like(updates[0].weights, dtype=torch.float64)
    for u in updates:
        acc.add_(u.weights.to(torch.float64), alpha=u.samples / total)
    return acc


def by_rank(updates: list[Update]) -> list[Update]:
    """The updates in rank order, so that ties are broken the same way every run."""
    return sorted(updates, key=lambda u: u.rank)


def stack(updates: list[Update]) -> torch.Tensor:
    """The updates' weights as rows of one (n, P) tensor; a copy of all of them."""
    return torch.stack([u.weights for u in by_rank(updates)])


def require_param(ok: bool, key: str, value: Any, rule: str) -> None:
    """A ConfigError for a strategy setting that `config.validate` leaves alone."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {rule}")


def load_tensor(state: dict[str, Any], key: str, name: str) -> torch.Tensor | None:
    """A saved state tensor, copied so that the caller's dict stays untouched."""
    value = state.get(key)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise StrategyError(f"the saved {name} state has {key} of type "
                            f"{type(value).__name__}, not a tensor")
    return value.detach().clone()


def match_state(
    tensor: torch.Tensor, global_weights: torch.Tensor, key: str, name: str
) -> torch.Tensor:
    """A state tensor on the global tensor's device, after checking its shape."""
    if tensor.shape != global_weights.shape:
        raise StrategyError(
            f"the {name} state {key} has shape {tuple(tensor.shape)} but the global "
            f"model {tuple(global_weights.shape)}; the checkpoint is of another model"
        )
    return tensor.to(device=global_weights.device, dtype=global_weights.dtype)
