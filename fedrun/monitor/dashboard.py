"""The dashboard: one frame drawn from a status object, live or printed once.

`render` is a pure function of the status (plus the clock, for "updated 3s ago"), so
the server's own terminal (`LiveDashboard`) and `fedrun watch` in any other terminal
show the same frame. Text from the run (device names, messages, events) is always
wrapped in `Text`, never parsed as rich markup: a name like "[lab]" must print as is.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedrun.monitor.status import FINAL_STATES, STATUS_NAME, StatusError, read_status

RECENT_EVENTS = 8
# A server heartbeats the status file every comm.heartbeat_s; this much silence means
# it is probably gone, which a reader can only guess from the file's age.
STALE_AFTER_S = 30.0
# TODO(watch): a server killed by SIGKILL leaves RUNNING behind forever; watch only
# flags it as "server silent?" and keeps following until Ctrl-C.

SERVER_STYLES = {
    "STARTING": "yellow", "RUNNING": "green", "CHECKPOINTING": "cyan",
    "FINISHED": "bold green", "STOPPED": "bold yellow", "FAILED": "bold red",
}
DEVICE_STYLES = {
    "IDLE": "dim", "TRAINING": "cyan", "RETRYING": "yellow", "COMPLETED": "green",
    "FAILED": "red", "TIMEOUT": "red", "REJECTED": "magenta",
    "QUARANTINED": "bold magenta",
}


def render(status: dict[str, Any], now: float | None = None) -> RenderableType:
    """One frame: header, device table, recent activity, round and run progress."""
    now = time.time() if now is None else now
    return Group(
        _header(status, now),
        _device_table(status.get("devices") or []),
        Text(""),
        _activity(status.get("events") or []),
        Text(""),
        _progress(status),
    )


def _header(status: dict[str, Any], now: float) -> Panel:
    state = str(status.get("state", "?"))
    phase = status.get("phase")
    line = Text()
    line.append("run ", style="dim").append(str(status.get("run", "?")), style="bold")
    line.append("   ").append(state, style=SERVER_STYLES.get(state, ""))
    if phase and state not in FINAL_STATES:
        line.append(f" ({phase})", style="dim")
    line.append("   round ", style="dim").append(_fraction(status, "round", "rounds"))
    line.append("   accuracy ", style="dim").append(_percent(status.get("accuracy")))
    line.append("   loss ", style="dim").append(_number(status.get("loss"), 3))
    line.append("   devices ", style="dim")
    line.append(_fraction(status, "devices_connected", "devices_total"))

    times = Text(style="dim")
    started, updated = status.get("started_at"), status.get("updated_at")
    if _is_number(started):
        times.append(f"started {_clock(started)}")
        if _is_number(updated):
            times.append(f"   elapsed {_duration(updated - started)}")
    if _is_number(updated):
        age = max(0.0, now - updated)
        stale = age > STALE_AFTER_S and state not in FINAL_STATES
        times.append("   updated ")
        times.append(f"{_duration(age)} ago" + (" (server silent?)" if stale else ""),
                     style="bold red" if stale else "")
    lines = [line, times] if times.plain else [line]
    return Panel(Group(*lines), title="fedrun", title_align="left")


def _device_table(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="devices", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for name in ("rank", "name", "state", "progress", "accuracy", "loss", "samples",
                 "memory MB"):
        table.add_column(name, justify="left" if name in ("name", "state") else "right",
                         no_wrap=True)
    # Columns most runs never need stay hidden rather than filling the table with "-".
    show_cuda = any(_is_number(d.get("cuda_memory_mb")) for d in devices)
    show_note = any(d.get("message") for d in devices)
    if show_cuda:
        table.add_column("CUDA MB", justify="right")
    if show_note:
        table.add_column("note")

    for device in devices:
        state = str(device.get("state", "?"))
        state_text = Text(state, style=DEVICE_STYLES.get(state, ""))
        if state == "RETRYING" and device.get("attempt") is not None:
            state_text.append(f" (attempt {device['attempt']})")
        row = [
            Text(str(device.get("rank", "?"))),
            Text(str(device.get("name", ""))),
            state_text,
            Text(_percent(_device_progress(device), digits=0)),
            Text(_percent(device.get("accuracy"))),
            Text(_number(device.get("loss"), 3)),
            Text(_count(device.get("samples"))),
            Text(_number(device.get("memory_mb"), 0)),
        ]
        if show_cuda:
            row.append(Text(_number(device.get("cuda_memory_mb"), 0)))
        if show_note:
            # One line per device keeps the live frame's height fixed as notes change.
            row.append(Text(str(device.get("message") or ""), no_wrap=True,
                            overflow="ellipsis"))
        table.add_row(*row)
    return table


def _activity(events: list[dict[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.title = "recent activity"
    grid.title_justify = "left"
    grid.add_column(style="dim")
    grid.add_column()
    if not events:
        grid.add_row("", Text("no events yet", style="dim"))
    for event in events[-RECENT_EVENTS:]:
        stamp = event.get("time")
        grid.add_row(_clock(stamp) if _is_number(stamp) else "",
                     Text(str(event.get("text", ""))))
    return grid


def _progress(status: dict[str, Any]) -> Table:
    devices = status.get("devices") or []
    # Devices left out of this round (server.fraction < 1) stay IDLE; counting them
    # would keep the round bar from ever reaching 100%.
    working = [d for d in devices if d.get("state") != "IDLE"] or devices
    round_done = sum(_device_progress(d) or 0.0 for d in working) / max(1, len(working))
    rounds = status.get("rounds")
    run_done = 0.0
    if _is_number(rounds) and rounds > 0 and _is_number(status.get("round")):
        run_done = min(1.0, max(0.0, status["round"] / rounds))

    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(width=50)
    grid.add_column(justify="right")
    grid.add_row(f"round {status.get('round', '?')}", ProgressBar(1.0, round_done),
                 _percent(round_done, digits=0))
    grid.add_row("run", ProgressBar(1.0, run_done),
                 _fraction(status, "round", "rounds"))
    return grid


def _device_progress(device: dict[str, Any]) -> float | None:
    progress = device.get("progress")
    if _is_number(progress):
        return min(1.0, max(0.0, float(progress)))
    return 1.0 if device.get("state") == "COMPLETED" else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value: Any, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%" if _is_number(value) else "-"


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def _count(value: Any) -> str:
    return f"{int(value):,}" if _is_number(value) else "-"


def _fraction(status: dict[str, Any], part: str, whole: str) -> str:
    return f"{status.get(part, '?')}/{status.get(whole, '?')}"


def _clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class LiveDashboard:
    """The server's own live frame; `update` only swaps the status, a rich thread draws.

    `update` does no terminal I/O, so a slow terminal delays the redraw, not the round.
    While it runs, rich redirects sys.stdout and sys.stderr so that prints land above
    the frame; a logging.StreamHandler made before `start` still holds the real
    stream and would write through the frame, so make it after `start` (or hand it
    `console.file`).
    """

    def __init__(self, console: Console | None = None) -> None:
        self._console = console if console is not None else Console()
        self._status: dict[str, Any] = {"state": "STARTING"}
        self._live: Live | None = None

    @property
    def console(self) -> Console:
        return self._console

    def start(self) -> None:
        if self._live is not None:
            return
        self._live = Live(console=self._console, refresh_per_second=2,
                          get_renderable=lambda: render(self._status))
        self._live.start()

    def update(self, status: dict[str, Any]) -> None:
        # A copy, because the server keeps mutating its dict while the rich thread
        # iterates over this one; the status is a few KB, so the copy is cheap.
        self._status = copy.deepcopy(status)

    def stop(self) -> None:
        if self._live is None:
            return
        self._live.refresh()  # the last status, not the one from half a second ago
        self._live.stop()
        self._live = None

    def __enter__(self) -> LiveDashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def use_dashboard(enabled_in_config: bool, stream: TextIO | None = None) -> bool:
    """Draw live only when run.dashboard allows it, FEDRUN_NO_DASHBOARD does not
    forbid it, and `stream` (sys.stdout by default) is a terminal; a log file or a
    pipe gets plain log lines instead of redraw codes."""
    if not enabled_in_config:
        return False
    if os.environ.get("FEDRUN_NO_DASHBOARD", "") not in ("", "0"):
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def watch(run_dir: Path, once: bool, interval: float = 1.0,
          console: Console | None = None, max_wait_s: float | None = None) -> int:
    """Draw `run_dir/status.json`: 0 when the run finished (or, with `once`, when a
    frame was printed), 1 when it failed, 2 when there was no readable status file
    (at once with `once`, after `max_wait_s` seconds of waiting when following)."""
    path = Path(run_dir) / STATUS_NAME
    out = console if console is not None else Console()
    errors = console if console is not None else Console(stderr=True)
    if once:
        try:
            status = read_status(path)
        except StatusError as exc:
            _say(errors, str(exc))
            return 2
        out.print(render(status))
        return 0
    try:
        return _follow(path, interval, out, errors, max_wait_s)
    except KeyboardInterrupt:  # Ctrl-C is how a person stops watching; no traceback
        return 130


def _follow(path: Path, interval: float, out: Console, errors: Console,
            max_wait_s: float | None) -> int:
    latest: dict[str, Any] = {}
    # A terminal gets one frame redrawn in place; a pipe or file gets a new frame only
    # when something a reader cares about changed, not one per heartbeat.
    live = Live(console=out, auto_refresh=False, get_renderable=lambda: render(latest))
    drawn_key: tuple | None = None
    last_error = ""
    waiting_since = time.monotonic()
    with live if out.is_terminal else nullcontext():
        while True:
            try:
                latest = read_status(path)
            except StatusError as exc:
                if str(exc) != last_error:
                    _say(errors, str(exc))
                    last_error = str(exc)
                waited = time.monotonic() - waiting_since
                if max_wait_s is not None and waited >= max_wait_s:
                    return 2
                time.sleep(interval)  # polling a file; there is nothing to wait on
                continue

            waiting_since, last_error = time.monotonic(), ""
            if out.is_terminal:
                live.refresh()
            elif _frame_key(latest) != drawn_key:
                out.print(render(latest))
                drawn_key = _frame_key(latest)
            if latest["state"] in FINAL_STATES:
                return 1 if latest["state"] == "FAILED" else 0
            time.sleep(interval)


def _frame_key(status: dict[str, Any]) -> tuple:
    devices = tuple((d.get("rank"), d.get("state"))
                    for d in status.get("devices") or [])
    # The newest event, not the count: the server keeps only the last few events.
    events = status.get("events") or [{}]
    return (status.get("state"), status.get("round"), status.get("phase"), devices,
            events[-1].get("time"), events[-1].get("text"))


def _say(console: Console, line: str) -> None:
    # soft_wrap keeps the message one line however narrow the terminal is.
    console.print(Text(line), soft_wrap=True, highlight=False)
