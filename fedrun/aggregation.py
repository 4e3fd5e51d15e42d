"""From gathered updates to new global weights: mask what must not count, clip and
noise where privacy asks for it, and let the strategy aggregate the rest."""

from __future__ import annotations

import torch

from .config import Config
from .device import OK, REJECTED, SKIPPED, seed_for
from .strategies import Strategy, StrategyError, Update
from .strategies.privacy import clip_update, gaussian_noise


class Aggregator:
    def __init__(self, cfg: Config, strategy: Strategy, client_rank: dict[int, int],
                 slots: int):
        self.cfg, self.strategy = cfg, strategy
        self.client_rank, self.slots = client_rank, slots
        self.ranks = list(range(1, cfg.devices.count + 1))

    def collect(self, weights: torch.Tensor, headers: dict[int, dict],
                gathered: list[torch.Tensor]) -> tuple[list[Update], dict, dict]:
        """Usable client updates, and the masked devices and clients with reasons."""
        masked: dict[str, dict] = {}
        client_masked: dict[str, dict] = {}
        updates: list[Update] = []
        for rank in self.ranks:
            header = headers[rank]
            slots = gathered[rank].view(self.slots, -1)
            used = 0
            for result in header.get("clients") or []:
                update = slots[result["slot"]]
                reason = mask_reason(result, update, weights, self.cfg.server.max_update_norm)
                if reason is not None:
                    client_masked[str(result["client"])] = reason
                    continue
                # DP-FedAvg weighs clipped updates equally: sample weights would break the
                # clip_norm / n bound on one device's influence that the noise is sized for.
                weight = 1 if self.cfg.privacy.noise_multiplier else result["samples"]
                updates.append(Update(result["client"] + 1,
                                      self._privatise(weights, update), weight))
                used += 1
            if not used:
                first = next(iter(header.get("clients") or []), None)
                masked[str(rank)] = (client_masked[str(first["client"])] if first else
                                     {"status": header["status"],
                                      "message": header.get("message", "")})
        return updates, masked, client_masked

    def aggregate(self, weights: torch.Tensor, updates: list[Update],
                  server_round: int) -> tuple[torch.Tensor | None, str]:
        """New global weights, or None and the reason the round must be skipped."""
        need = max(self.cfg.server.min_devices, self.strategy.min_updates())
        if len(updates) < need:
            return None, f"{len(updates)} usable updates, fewer than the {need} needed"
        try:
            new = self.strategy.aggregate(weights, updates, server_round)
        except StrategyError as exc:
            return None, str(exc)
        new = self._add_noise(new, len(updates), server_round)
        if not torch.isfinite(new).all():
            return None, "the aggregate is not finite"
        return new, ""

    def _privatise(self, weights: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.privacy.clip_norm
        if not clip:
            return update
        return weights + clip_update(update - weights, clip)

    def _add_noise(self, new: torch.Tensor, count: int, server_round: int) -> torch.Tensor:
        privacy = self.cfg.privacy
        if not privacy.noise_multiplier:
            return new
        gen = torch.Generator().manual_seed(seed_for(self.cfg.run.seed, server_round, 0, 3))
        std = privacy.noise_multiplier * privacy.clip_norm / count
        return new + gaussian_noise(new.shape, std, gen)


def mask_reason(header: dict, update: torch.Tensor, weights: torch.Tensor,
                max_norm: float) -> dict | None:
    """Why an update must not count, or None when it is usable."""
    if header["status"] != OK:
        return {"status": header["status"], "message": header.get("message", "")}
    if header["samples"] <= 0:
        return {"status": REJECTED, "message": "reported 0 samples"}
    delta = update - weights
    if not torch.isfinite(delta).all():
        return {"status": REJECTED, "message": "non-finite update (NaN or inf)"}
    norm = float(delta.norm())
    if max_norm and norm > max_norm:
        return {"status": REJECTED, "message": f"update norm {norm:.3g} exceeds "
                f"server.max_update_norm = {max_norm:g}"}
    return None


def skipped_masks(record: dict) -> None:
    """A skipped round keeps every device accounted for: participants become masked."""
    for rank in record["participants"]:
        record["masked"][str(rank)] = {"status": SKIPPED,
                                       "message": f"round skipped: {record['reason']}"}
    record["participants"] = []
