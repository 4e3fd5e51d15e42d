"""Checkpoints: one file per saved round, written atomically, with a `latest` pointer.

A crash at any instant leaves the previous checkpoint or the new one, never a broken file
under a final name (see atomic.py). Files hold only tensors and plain Python values and
are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_write
from .config import Config, ConfigError, digest, resume_values

log = logging.getLogger("fedrun")

FORMAT = 1
NAME = re.compile(r"^round-(\d{4,})\.pt$")


def file_name(server_round: int) -> str:
    return f"round-{server_round:04d}.pt"


def save(folder: Path, server_round: int, state: dict, keep: int,
         before_rename: Callable[[], None] | None = None) -> Path:
    """Save `state` as round-NNNN.pt, point `latest` at it, keep the newest `keep`."""
    path = folder / file_name(server_round)
    state = dict(state, format=FORMAT, round=server_round, saved_at=time.time())
    atomic_write(path, lambda f: torch.save(state, f), before_rename)
    atomic_write(folder / "latest", lambda f: f.write(path.name.encode() + b"\n"))
    for old in _rounds(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def _rounds(folder: Path) -> list[Path]:
    """Checkpoint files, newest round first."""
    found = [(int(m.group(1)), p) for p in folder.glob("round-*.pt")
             if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back whole; a broken one is reported and skipped."""
    candidates = _rounds(folder)
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for stale in folder.glob(".round-*.tmp"):
        log.warning("ignoring %s: a checkpoint write that did not finish", stale)
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("not a fedrun checkpoint")
        except Exception as exc:  # torch.load raises many types for a broken file
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path,
                        type(exc).__name__)
            continue
        return path, state
    return None


def check_compatible(cfg: Config, state: dict, path: Path) -> None:
    """Refuse to resume a run whose defining values changed; more rounds are fine."""
    saved = state["resume_values"]
    if state["config_digest"] == digest(resume_values(cfg)):
        return
    current = resume_values(cfg)
    diffs = [f"{k} was {saved.get(k)!r}, now {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    raise ConfigError(
        f"cannot resume {path}: " + "; ".join(diffs) + ". Put the values back, use "
        "another run.name, or start over with --fresh")
