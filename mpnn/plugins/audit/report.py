"""A reviewer's summary of a run's trail, in Markdown or HTML: the verification result, who ran what where and
when, code and data provenance, plugins, policy verdicts, epochs, checkpoints, errors, restarts and the end.

The report is built as a list of blocks (heading, paragraph, key-value list, table, bullet list) and then
rendered, so Markdown and HTML say the same thing.
"""

from __future__ import annotations

import html
import json

from mpnn.plugins.audit.trail import Verdict


def _short(value, width: int = 16) -> str:
    text = "" if value is None else str(value)
    return text[:width] + "…" if len(text) > width + 1 else text


def _by_kind(records: list) -> dict:
    kinds: dict = {}
    for record in records:
        kinds.setdefault(record.get("kind"), []).append(record)
    return kinds


def build(run_dir, verdict: Verdict) -> list:
    """The report's blocks: ("h1"|"h2"|"p", text), ("kv", [(key, value)]), ("table", headers, rows),
    ("list", items)."""
    kinds = _by_kind(verdict.records)
    start = (kinds.get("run_start") or [{}])[0].get("data", {})
    end = (kinds.get("run_end") or [{}])[-1].get("data", {})
    blocks = [
        ("h1", f"Audit report: run {start.get('run_id') or run_dir}"),
        ("p", ("**Trail verified: intact.** " if verdict.ok else "**Trail verification FAILED:** ") + verdict.message),
    ]
    blocks += [
        ("h2", "Run"),
        (
            "kv",
            [
                ("Run id", start.get("run_id")),
                ("Status", end.get("status", "(no run_end record)")),
                ("Started", (kinds.get("run_start") or [{}])[0].get("time")),
                ("Ended", (kinds.get("run_end") or [{}])[-1].get("time")),
                ("Who", f"{start.get('user')} (uid {start.get('uid')})"),
                ("Host", start.get("host")),
                ("Platform", start.get("platform")),
                ("Command line", " ".join(map(str, start.get("command_line") or []))),
                ("World size", f"{start.get('world_size')} ({start.get('nnodes', 1)} node(s))"),
                ("Seed", _seed_text(start, kinds.get("seed", []))),
                ("Exit codes", json.dumps(end.get("exit_codes")) if "exit_codes" in end else None),
                ("Launcher error", end.get("error")),
            ],
        ),
    ]
    code = start.get("code") or {}
    git = code.get("git") or {}
    blocks += [
        ("h2", "Code"),
        (
            "kv",
            [
                ("Script", code.get("path") or code.get("script")),
                ("Script SHA-256", code.get("sha256")),
                ("Git commit", git.get("commit") or f"none ({git.get('reason')})"),
                (
                    "Working tree",
                    None
                    if not git.get("commit")
                    else (
                        f"dirty: {git.get('changed_files')} changed, {git.get('untracked_files')} untracked"
                        if git.get("dirty")
                        else "clean"
                    ),
                ),
                ("Diff SHA-256 (git diff HEAD)", git.get("diff_sha256")),
            ],
        ),
    ]
    versions = start.get("versions") or {}
    if versions:
        blocks += [
            (
                "table",
                ["Package", "Version"],
                [[k, v if v is not None else "not installed"] for k, v in versions.items()],
            )
        ]
    blocks += _data_blocks(kinds.get("dataset", []))
    plugins = ((kinds.get("plugins") or [{}])[0].get("data") or {}).get("plugins") or []
    blocks += [
        ("h2", "Plugins"),
        (
            "table",
            ["Name", "Version", "Options", "Origin", "Source SHA-256"],
            [
                [
                    p.get("name"),
                    p.get("version"),
                    json.dumps(p.get("options"), sort_keys=True),
                    p.get("origin"),
                    _short(p.get("sha256")),
                ]
                for p in plugins
            ],
        )
        if plugins
        else ("p", "No plugins."),
    ]
    blocks += _policy_blocks(kinds.get("policy", []))
    blocks += _epoch_blocks(kinds.get("epoch", []))
    checkpoints = kinds.get("checkpoint", [])
    rows = [[c["seq"], c["data"].get("step"), c["data"].get("path"), c["data"].get("sha256")] for c in checkpoints]
    blocks += [
        ("h2", "Checkpoints"),
        ("table", ["Record", "Step", "Path", "SHA-256"], rows) if rows else ("p", "No checkpoint saved."),
    ]
    events = [r for r in verdict.records if r.get("kind") in ("error", "restart")]
    blocks += [
        ("h2", "Errors and restarts"),
        ("list", [f"record {r['seq']} ({r['time']}): {r['kind']}: " + _event_text(r) for r in events])
        if events
        else ("p", "None."),
    ]
    head = verdict.head or {}
    blocks += [
        ("h2", "Trail"),
        (
            "kv",
            [
                ("Records", len(verdict.records)),
                ("Key fingerprint", verdict.records[0].get("key") if verdict.records else head.get("key")),
                ("Signed head", f"record {head.get('seq')}, hash {_short(head.get('hash'))}" if head else "none"),
                ("Verification", verdict.message),
            ],
        ),
    ]
    return blocks


def _seed_text(start: dict, seeds: list) -> str:
    if seeds:
        return ", ".join(f"{s['data'].get('seed')} (from {s['data'].get('from')}, record {s['seq']})" for s in seeds)
    if start.get("seed") is not None:
        return f"{start['seed']} (from the {start.get('seed_from')})"
    return "none set by the script"


def _event_text(record: dict) -> str:
    data = record.get("data") or {}
    if record["kind"] == "error":
        return f"rank {data.get('rank')}: {data.get('type')}: {data.get('message')} (at {data.get('where')})"
    return f"attempt {data.get('attempt')}: {data.get('reason')} (ranks {data.get('ranks')})"


def _data_blocks(datasets: list) -> list:
    if not datasets:
        return [("h2", "Data"), ("p", "No dataset fingerprint recorded.")]
    blocks = [("h2", "Data")]
    for record in datasets:
        data = record["data"]
        blocks.append(
            (
                "p",
                f"**{data.get('name')}**: {data.get('size')} samples, data SHA-256 "
                f"`{data.get('data_sha256')}`, "
                + ("the same on every rank." if data.get("consistent") else "**differs between ranks**."),
            )
        )
        blocks.append(
            (
                "table",
                ["Rank", "Shard indices SHA-256", "Data SHA-256"],
                [
                    [s.get("rank"), s.get("indices_sha256"), _short(s.get("data_sha256"))]
                    for s in data.get("shards", [])
                ],
            )
        )
    return blocks


def _policy_blocks(policies: list) -> list:
    if not policies:
        return [("h2", "Policy"), ("p", "No policy.")]
    rows = [
        [
            p["data"].get("stage"),
            p["data"].get("path"),
            _short(p["data"].get("sha256")),
            p["data"].get("verdict"),
            "; ".join(p["data"].get("violations") or []) or "none",
        ]
        for p in policies
    ]
    return [("h2", "Policy"), ("table", ["Stage", "File", "SHA-256", "Verdict", "Violations"], rows)]


def _epoch_blocks(epochs: list) -> list:
    if not epochs:
        return [("h2", "Epochs"), ("p", "No epoch recorded.")]
    keys = sorted({k for e in epochs for k in (e["data"].get("metrics") or {})})
    rows = [[e["data"].get("epoch"), *[_number(e["data"].get("metrics", {}).get(k)) for k in keys]] for e in epochs]
    return [("h2", "Epochs"), ("table", ["Epoch", *keys], rows)]


def _number(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def to_markdown(blocks: list) -> str:
    """Render blocks as GitHub Markdown."""

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "kv":
            out.append("\n".join(f"- **{k}:** {cell(v)}" for k, v in block[1] if v is not None))
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append(
                "\n".join(
                    ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                    + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
                )
            )
        elif kind == "list":
            out.append("\n".join(f"- {cell(item)}" for item in block[1]))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list) -> str:
    """Render blocks as one standalone HTML page."""

    def esc(value) -> str:
        text = html.escape("" if value is None else str(value), quote=False)
        for mark, tag in (("**", "strong"), ("`", "code")):  # the report's only inline markup
            text = "".join(f"<{tag}>{p}</{tag}>" if i % 2 else p for i, p in enumerate(text.split(mark)))
        return text

    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "kv":
            body.append(
                "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in block[1] if v is not None) + "</dl>"
            )
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
    title = esc(blocks[0][1]) if blocks else "Audit report"
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}dt{font-weight:bold}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style>'
        f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render(run_dir, verdict: Verdict, fmt: str = "md") -> str:
    """The report of a run as Markdown ("md") or HTML ("html")."""
    blocks = build(run_dir, verdict)
    return to_html(blocks) if fmt == "html" else to_markdown(blocks)
