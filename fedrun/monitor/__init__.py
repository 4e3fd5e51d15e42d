"""Monitoring: what a run is doing, for people watching it while it runs and after.

The server owns the truth. It writes `runs/<name>/status.json` (`status.py`), may draw
it in its own terminal (`dashboard.LiveDashboard`), and writes TensorBoard event files
(`tensorboard.py`). Any other terminal reads the status file with `dashboard.watch`.
Nothing here talks to a process group, so a reader can never slow a round down.

Importing this package stays light (no torch): `watch` must start fast on a laptop
that only looks at a run.
"""
