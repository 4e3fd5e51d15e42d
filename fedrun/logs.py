"""One log format for every rank, with identity and progress in front of each line:
`[server round 4/20]` or `[device 3 Company round 4]`."""

from __future__ import annotations

import logging
import sys

from .config import Config
from .report import wants_dashboard


class _Identity(logging.Filter):
    def __init__(self, cfg: Config, rank: int, context: dict):
        super().__init__()
        self.cfg, self.rank, self.context = cfg, rank, context

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            server = self.context.get("server")
            now = server.round if server is not None else 0
            record.who = f"server round {now}/{self.cfg.run.rounds}"
        else:
            device = self.context.get("device")
            now = device.status.round if device is not None else 0
            record.who = f"device {self.rank} {self.cfg.device_name(self.rank)} round {now}"
        return True


def setup_logging(cfg: Config, rank: int, context: dict) -> None:
    """Log to runs/<run>/logs/ always, and to stderr unless the dashboard owns the
    terminal (lines from six processes would tear its frames apart)."""
    folder = cfg.run_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    name = "server.log" if rank == 0 else f"device-{rank}.log"
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s [%(who)s] %(message)s",
                            datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(folder / name)]
    if not wants_dashboard(cfg):
        handlers.append(logging.StreamHandler(sys.stderr))
    logger = logging.getLogger("fedrun")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    identity = _Identity(cfg, rank, context)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(identity)
        logger.addHandler(handler)
