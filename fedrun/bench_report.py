"""The bench's entries and table: timings in, {name, value, reference, ratio, unit} out.

Round times come from the workload's summary.json. A round there is `seconds` (plan to
evaluation) plus its checkpoint; what the server does after that (the round's log line,
TensorBoard, summary.json) shows only as the gap before the next round starts, so it is
counted into "other". The last round has no next one: its gap is the mean of the others.
"""

from __future__ import annotations

import statistics

PHASES = ("broadcast", "train", "gather", "aggregate", "evaluate", "checkpoint")
LABELS = {"broadcast": "broadcast", "train": "waiting for devices", "gather": "gather",
          "aggregate": "aggregation", "evaluate": "evaluation",
          "checkpoint": "checkpoint", "other": "other"}


def entry(group: str, name: str, value: float | None, reference: float | None,
          unit: str, target: tuple[str, float] | None = None, **extra) -> dict:
    """One measurement; ratio is value / reference, and None without a reference."""
    ratio = None
    if value is not None and reference not in (None, 0):
        ratio = value / reference
    out = {"name": name, "value": value, "reference": reference, "ratio": ratio,
           "unit": unit, "group": group}
    if target is not None:
        op, bound = target
        out["target"] = f"{op} {bound:g}"
        out["passed"] = ratio is not None and (ratio <= bound if op == "<=" else
                                               ratio >= bound)
    out.update(extra)
    return out


def round_times(summary: dict, epochs: int) -> list[dict]:
    """Each round's phases, 'other', total seconds and samples trained (all epochs)."""
    rounds = summary["rounds"]
    starts = [r["time"] - r["seconds"] for r in rounds]
    gaps = [max(0.0, starts[i + 1] - r["time"] - r["phases"]["checkpoint"])
            for i, r in enumerate(rounds[:-1])]
    spare = statistics.mean(gaps) if gaps else 0.0
    out = []
    for i, r in enumerate(rounds):
        phases = r["phases"]
        inside = sum(phases[k] for k in PHASES if k != "checkpoint")
        after = gaps[i] if i < len(gaps) else spare
        samples = sum(d.get("samples") or 0 for d in r["devices"].values())
        out.append({**{k: phases[k] for k in PHASES},
                    "other": max(0.0, r["seconds"] - inside) + after,
                    "total": r["seconds"] + phases["checkpoint"] + after,
                    "samples": samples * epochs})
    return out


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def side_by_side(found: dict, label: str) -> dict:
    """A job's bare loop as its parts ran it on their cores: summed samples/s."""
    runs = [p["jobs"][label] for p in found["reference"]["parts"] if label in p["jobs"]]
    samples = sum(r["samples"] for r in runs)
    rate = sum(r["samples_per_s"] for r in runs)
    return {"samples": samples, "samples_per_s": rate, "seconds": samples / rate,
            "cpu_s": sum(r["cpu_s"] for r in runs), "processes": len(runs),
            "rounds": runs[0]["rounds"]}


def overhead_entries(found: dict, plan) -> list[dict]:
    job = found["workload"]
    bare = side_by_side(found, "workload")
    one = found["reference"]["one_process"]["jobs"]["workload"]
    rows = round_times(job.summary, plan.local_epochs)
    total = sum(r["total"] for r in rows)
    mean_round = _mean(rows, "total")
    trained = sum(r["samples"] for r in rows)
    same = trained == bare["samples"]
    cores = f"{bare['processes']} core(s)"
    started = max(p["wall_s"] for p in found["reference"]["parts"])
    out = [
        entry("overhead", f"fedrun rounds / bare loop on {cores}", total,
              bare["seconds"], "s", rounds=len(rows), same_samples=same),
        entry("overhead", f"fedrun rounds / bare loop, 1 process x {one['threads']} "
              "thread(s)", total, trained / one["samples_per_s"], "s"),
        entry("overhead", "fedrun job / bare-loop processes (incl. start-up)",
              job.wall_s, started, "s"),
    ]
    if len(rows) > 1:
        later = statistics.median(r["total"] for r in rows[1:])
        out.append(entry("overhead", "first round / median of the later ones",
                         rows[0]["total"], later, "s"))
    for key in (*PHASES, "other"):
        out.append(entry("overhead", f"share of round: {LABELS[key]}", _mean(rows, key),
                         mean_round, "s/round"))
    out.append(entry("overhead", "not local training / round time",
                     mean_round - _mean(rows, "train"), mean_round, "s/round",
                     target=("<=", 0.05)))
    # CPU seconds hardly change when other processes take turns on the cores, so this
    # is the ratio to trust on a busy machine.
    rounds = job.summary["rounds"]
    start, end = rounds[0]["time"] - rounds[0]["seconds"], rounds[-1]["time"]
    cpu = sum(u.cpu_between(start, end) for u in job.ranks.values())
    out.append(entry("overhead", "CPU seconds of all ranks / bare loop's", cpu,
                     bare["cpu_s"], "s", window="round 1 start to last evaluation"))
    speed = trained / sum(r["train"] for r in rows)
    out.append(entry("throughput", f"training throughput vs bare loop on {cores}",
                     speed, bare["samples_per_s"], "samples/s", target=(">=", 0.9),
                     same_samples=same))
    devices_cpu = sum(u.cpu_between(start, end) for r, u in job.ranks.items() if r)
    out.append(entry("throughput", "samples per CPU-second of the devices vs bare loop",
                     trained / max(devices_cpu, 1e-9), bare["samples"] / bare["cpu_s"],
                     "samples/CPU-s"))
    out.append(entry("throughput", f"training throughput vs 1 process x "
                     f"{one['threads']} thread(s)", speed, one["samples_per_s"],
                     "samples/s"))
    return out


def comm_entries(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        m, devices = r["model"], r["devices"]
        payload = 2 * devices * r["flat_bytes"]
        seconds = r["seconds"]
        out.append(entry("comm", f"{m}: bytes per round", r["sent_bytes"] / 1e6,
                         2 * devices * r["model_bytes"] / 1e6, "MB"))
        out.append(entry("comm", f"{m}: broadcast+gather bandwidth",
                         payload / seconds["fedrun"] / 1e6,
                         payload / seconds["raw"] / 1e6, "MB/s", target=(">=", 0.8),
                         turns=r["rounds"]))
        out.append(entry("comm", f"{m}: the same with unpack/pack",
                         payload / seconds["fedrun+pack"] / 1e6,
                         payload / seconds["raw"] / 1e6, "MB/s"))
    return out


def scale_entries(found: dict) -> list[dict]:
    # The median keeps the first round out: it also pays one-off costs (see below).
    out, fewest = [], None
    for count, job in sorted(found["scale"].items()):
        rows = round_times(job.summary, 1)
        value = statistics.median(r["total"] for r in rows)
        bare = side_by_side(found, f"scale-{count}")
        fewest = fewest if fewest is not None else value
        out.append(entry("scaling", f"round time (median), {count} devices",
                         value, bare["seconds"] / bare["rounds"], "s/round",
                         vs_fewest=value / fewest))
        out.append(entry("scaling", f"first round / median round, {count} devices",
                         rows[0]["total"], value, "s"))
    return out


def checkpoint_entries(results: dict) -> list[dict]:
    return [entry("checkpoint", f"checkpoint save, {m} ({r['bytes'] / 1e6:.1f} MB)",
                  r["fedrun_mb_s"], r["plain_mb_s"], "MB/s")
            for m, r in results.items()]


def memory_entries(found: dict) -> list[dict]:
    # The process that trains every shard alone is the one to compare a rank with.
    job, ref = found["workload"], found["reference"]["one_process"]
    out = []
    for rank, usage in sorted(job.ranks.items()):
        who = "server (rank 0)" if rank == 0 else f"device {rank}"
        out.append(entry("memory", f"peak RSS, {who}", usage.peak_rss_mib,
                         ref["peak_rss_mib"], "MiB", cpu_s=usage.cpu_s,
                         threads=usage.threads))
    return out


def build_entries(found: dict, plan) -> list[dict]:
    return (overhead_entries(found, plan) + comm_entries(found["comm"])
            + scale_entries(found) + checkpoint_entries(found["checkpoint"])
            + memory_entries(found))


# ---- the table -----------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render_table(report: dict) -> str:
    head = ("measurement", "value", "reference", "ratio", "unit", "target", "result")
    rows = []
    for e in report["entries"]:
        result = "" if "passed" not in e else ("pass" if e["passed"] else "MISS")
        rows.append((e["name"], _num(e["value"]), _num(e["reference"]),
                     _num(e["ratio"]), e["unit"], e.get("target", ""), result))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(cells) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:4], widths[1:4])]
        tail = [c.ljust(w) for c, w in zip(cells[4:], widths[4:])]
        return "  ".join([first, *rest, *tail]).rstrip()

    m = report["machine"]
    tiny = " (--tiny: sizes that check the bench, not fedrun)" if report["tiny"] else ""
    out = [f"fedrun bench{tiny}: {m['cores_available']} of {m['cores_online']} cores, "
           f"{m['cpu_model']}, "
           f"{m['memory_total_gib']:.0f} GiB, torch {m['torch']}",
           line(head), line(["-" * w for w in widths])]
    group = None
    for e, row in zip(report["entries"], rows):
        if group is not None and e["group"] != group:
            out.append("")
        group = e["group"]
        out.append(line(row))
    busy = {k: v for k, v in report["contention"].items() if v["other_cores"] > 0.25}
    out.append("")
    if busy:
        out.append("contended: other processes used "
                   + ", ".join(f"{v['other_cores']:.2f} cores during {k}"
                               for k, v in busy.items())
                   + "; rerun on an idle machine for clean numbers")
    else:
        out.append("not contended: other processes used under 0.25 cores in every step")
    return "\n".join(out)
