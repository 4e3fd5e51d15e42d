"""The crash record: which devices vanished in which round, kept beside the checkpoints.

A crash happens between checkpoints, so the record lives in its own small file
(`checkpoints/<run>/crashes.json`, replaced atomically) that survives the restart. A
device named in two crashes of the same round is quarantined from that round on: the
same fault would otherwise crash every restart and the run could never finish.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .atomic import write_json

log = logging.getLogger("fedrun")


class CrashJournal:
    def __init__(self, path: Path):
        self.path = path
        self.blamed: set[int] = set()  # ranks already recorded in this attempt

    def read(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text())["crashes"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError):
            log.warning("%s is unreadable; starting a new crash record", self.path)
            return []

    def record(self, server_round: int, ranks: list[int], reason: str) -> dict[int, int]:
        """Add a crash (once per rank and attempt); returns the quarantine it implies."""
        ranks = [r for r in ranks if r not in self.blamed]
        crashes = self.read()
        if ranks:
            self.blamed.update(ranks)
            crashes.append({"round": server_round, "ranks": ranks, "reason": reason,
                            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                            "time": time.time()})
            write_json(self.path, {"crashes": crashes})
        return quarantine(crashes)


def quarantine(crashes: list[dict]) -> dict[int, int]:
    """Rank -> the first round in which it crashed twice."""
    seen: dict[tuple[int, int], int] = {}
    out: dict[int, int] = {}
    for crash in crashes:
        for rank in crash["ranks"]:
            key = (crash["round"], rank)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] >= 2:
                out[rank] = min(out.get(rank, crash["round"]), crash["round"])
    return out
