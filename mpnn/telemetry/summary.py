"""Per-rank summary of a run (step time median and p95, compute/communication share, bytes, peak RSS, events)
and straggler detection, as a JSON-ready dict and as table rows for `mpnn telemetry show`."""

from __future__ import annotations

import numpy as np

from mpnn.telemetry.reader import RankLog, Run, number

# mpnn.compile's counts in a step line's "compile" object (mpnn/capture: totals over the process's compiled steps)
COMPILE_KEYS = ("captures", "hits", "evictions", "recaptures", "eager", "entries")

# A rank is a straggler when its median step time exceeds the median of the other ranks' medians by this much.
STRAGGLER_EXCESS = 0.20


def summarize_rank(log: RankLog) -> dict:
    """One rank's figures; times in seconds, shares as fractions of the summed step time, bytes as totals."""
    step_s = np.array([s for s in (number(r, "step_s") for r in log.steps) if s is not None])
    total_s = float(step_s.sum())

    def share(key):
        return sum(number(r, key) or 0.0 for r in log.steps) / total_s if total_s > 0 else None

    rss = [v for v in (number(r, "rss_bytes") for r in log.steps) if v is not None]
    by_transport: dict[str, list[int]] = {}
    for record in log.steps:
        split = record.get("bytes_by_transport")
        if not isinstance(split, dict):
            continue
        for name, moved in split.items():
            if isinstance(name, str) and isinstance(moved, dict):
                total = by_transport.setdefault(name, [0, 0])
                total[0] += int(number(moved, "sent") or 0)
                total[1] += int(number(moved, "recv") or 0)
    waits = {"spun": 0, "blocked": 0}  # same-host mailbox waits that found a peer missing, by how they ended
    for record in log.steps:
        if isinstance(record.get("mailbox_waits"), dict):
            for key in waits:
                waits[key] += int(number(record["mailbox_waits"], key) or 0)
    compiled = None  # mpnn.compile's process totals, as the last step line that carries them has them
    for record in reversed(log.steps):
        if isinstance(record.get("compile"), dict):
            compiled = {k: int(number(record["compile"], k) or 0) for k in COMPILE_KEYS}
            break
    compile_warnings = [e for e in log.events if e.get("event") == "compile_warning"]
    errors = [e for e in log.events if e.get("event") == "error"]
    last_error = None
    if errors:
        kind, message = errors[-1].get("type", "error"), errors[-1].get("message")
        last_error = f"{kind}: {message}" if message else str(kind)
    return {
        "rank": log.rank,
        "steps": len(log.steps),
        "median_step_s": float(np.median(step_s)) if step_s.size else None,
        "p95_step_s": float(np.percentile(step_s, 95)) if step_s.size else None,
        "compute_share": share("compute_s"),
        "comm_share": share("comm_s"),
        "bytes_sent": int(sum(number(r, "bytes_sent") or 0 for r in log.steps)),
        "bytes_recv": int(sum(number(r, "bytes_recv") or 0 for r in log.steps)),
        "bytes_by_transport": {name: {"sent": s, "recv": r} for name, (s, r) in sorted(by_transport.items())},
        "peak_rss_bytes": int(max(rss)) if rss else None,
        "mailbox_waits": waits if any(isinstance(r.get("mailbox_waits"), dict) for r in log.steps) else None,
        "compile": compiled,
        "compile_warnings": [str(e.get("message")) for e in compile_warnings],
        "events": len(log.events),
        "errors": len(errors),
        "last_error": last_error,
        "bad_lines": log.bad_lines,
    }


def find_straggler(ranks: list[dict], excess: float = STRAGGLER_EXCESS) -> dict | None:
    """The slowest rank when its median step time beats the median of the others' medians by over `excess`."""
    timed = [r for r in ranks if r["median_step_s"] is not None]
    if len(timed) < 2:
        return None
    slowest = max(timed, key=lambda r: r["median_step_s"])
    others = float(np.median([r["median_step_s"] for r in timed if r is not slowest]))
    if others <= 0 or slowest["median_step_s"] <= others * (1 + excess):
        return None
    return {
        "rank": slowest["rank"],
        "median_step_s": slowest["median_step_s"],
        "others_median_step_s": others,
        "excess": slowest["median_step_s"] / others - 1,
    }


def summarize(run: Run) -> dict:
    """The whole run: its id and world size (from run.json when present), one dict per rank, the straggler."""
    ranks = [summarize_rank(log) for log in run.ranks.values()]
    world = run.meta.get("world")
    world_size = world.get("world_size") if isinstance(world, dict) else None
    return {
        "run_dir": str(run.path),
        "run_id": run.meta.get("run_id", run.path.name),
        "world_size": world_size if world_size is not None else len(ranks),
        "ranks": ranks,
        "straggler": find_straggler(ranks),
    }


def format_seconds(seconds: float | None) -> str:
    """A duration for people: '812 us', '4.10 ms', '2.35 s'; '-' when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_bytes(size: float | None) -> str:
    """A byte count for people in binary units: '512 B', '3.2 MiB'; '-' when unknown."""
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


HEADERS = (
    "rank",
    "steps",
    "median step",
    "p95 step",
    "compute",
    "comm",
    "sent",
    "recv",
    "peak RSS",
    "events",
    "errors",
)


def table_rows(summary: dict) -> list[tuple[str, ...]]:
    """One row of display strings per rank, in HEADERS order."""
    return [
        (
            str(r["rank"]),
            str(r["steps"]),
            format_seconds(r["median_step_s"]),
            format_seconds(r["p95_step_s"]),
            _percent(r["compute_share"]),
            _percent(r["comm_share"]),
            format_bytes(r["bytes_sent"]),
            format_bytes(r["bytes_recv"]),
            format_bytes(r["peak_rss_bytes"]),
            str(r["events"]),
            str(r["errors"]),
        )
        for r in summary["ranks"]
    ]


def notes(summary: dict) -> list[str]:
    """The lines under the table: the straggler verdict, each rank's last error, unreadable line counts."""
    straggler = summary["straggler"]
    if straggler:
        lines = [
            f"straggler: rank {straggler['rank']} (median {format_seconds(straggler['median_step_s'])}, "
            f"others {format_seconds(straggler['others_median_step_s'])}, +{straggler['excess'] * 100:.0f}%)"
        ]
    else:
        lines = ["straggler: none"]
    for r in summary["ranks"]:
        split = {name: m for name, m in (r.get("bytes_by_transport") or {}).items() if m["sent"] or m["recv"]}
        if split:
            moved = ", ".join(
                f"{name} {format_bytes(m['sent'])} sent / {format_bytes(m['recv'])} recv" for name, m in split.items()
            )
            lines.append(f"rank {r['rank']} bytes by transport: {moved}")
        waits = r.get("mailbox_waits")
        if waits and (waits["spun"] or waits["blocked"]):
            lines.append(
                f"rank {r['rank']} mailbox waits for a late peer: {waits['spun']} ended within the spin, "
                f"{waits['blocked']} slept on a futex"
            )
        c = r.get("compile")
        if c:
            lines.append(
                f"rank {r['rank']} compile: {c['captures']} captures, {c['hits']} hits, {c['evictions']} evictions, "
                f"{c['recaptures']} recaptures, {c['eager']} eager calls, {c['entries']} cached"
            )
        for message in r.get("compile_warnings") or ():
            lines.append(f"rank {r['rank']} compile warning: {message}")
        if r["last_error"]:
            lines.append(f"rank {r['rank']} error: {r['last_error']}")
        if r["bad_lines"]:
            lines.append(f"rank {r['rank']}: {r['bad_lines']} unreadable line(s) skipped")
    return lines


def format_text(summary: dict) -> str:
    """The summary as plain aligned text (for pipes and logs)."""
    rows = [HEADERS, *table_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    body = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    title = f"run {summary['run_id']} ({summary['world_size']} ranks) in {summary['run_dir']}"
    return "\n".join([title, *body, *notes(summary)])


def print_rich(summary: dict, console=None) -> None:
    """The summary as a rich table (for a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"run {summary['run_id']} ({summary['world_size']} ranks)",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    for header in HEADERS:
        table.add_column(header.replace(" ", "\n"), justify="right")
    straggler = (summary["straggler"] or {}).get("rank")
    for r, row in zip(summary["ranks"], table_rows(summary)):
        table.add_row(*row, style="red" if r["errors"] else "yellow" if r["rank"] == straggler else None)
    console.print(table)
    for line in notes(summary):
        console.print(line, highlight=False)
