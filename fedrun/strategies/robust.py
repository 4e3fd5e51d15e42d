"""What the Byzantine-robust strategies share: f = server.byzantine and its wording."""

from __future__ import annotations

from fedrun.config import ServerConfig
from fedrun.strategies.base import Strategy


class RobustStrategy(Strategy):
    """A strategy that assumes up to f = server.byzantine devices send bad updates.

    Robust strategies ignore sample counts: a bad device could claim any count, and
    letting it weigh its own update would undo the robustness. Every robust rule here is
    equivariant under translation, so working on the weights after local training gives
    the same result as working on the deltas (weights - global) of the papers.
    """

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg)
        self.f = cfg.byzantine

    def _needed(self, f: int) -> int:
        """The fewest updates the rule needs with f bad devices."""
        raise NotImplementedError

    def _rule(self) -> tuple[str, str]:
        """The formula for `_needed` and the reason for it."""
        raise NotImplementedError

    def min_updates(self) -> int:
        return self._needed(self.f)

    def _min_rule(self) -> str:
        formula, reason = self._rule()
        return f"{formula} with f = server.byzantine = {self.f}: {reason}"

    def _min_fix(self, num_devices: int) -> str:
        fix = f"raise devices.count to {self.min_updates()}"
        fits = [f for f in range(self.f) if self._needed(f) <= num_devices]
        if fits:
            lower = " or lower" if max(fits) > 0 else ""
            fix = f"set server.byzantine={max(fits)}{lower}, or " + fix
        return fix + ", or choose server.strategy=fedavg"
