"""`mpnn audit verify RUN_DIR` (exit 0 only for an intact trail, 2 for one closed as incomplete after its launcher
was killed, 1 for anything else) and `mpnn audit report RUN_DIR` (Markdown or
HTML for a reviewer)."""

from __future__ import annotations

from pathlib import Path

import click

from mpnn.plugins.audit import AuditError
from mpnn.plugins.audit.keys import key_path, load_key
from mpnn.plugins.audit.report import render
from mpnn.plugins.audit.trail import verify

_RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_KEY = click.option(
    "--key",
    "key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The audit key the trail was signed with [default: ~/.config/mpnn/audit.key].",
)


def _key(path: Path | None, run_dir: Path) -> bytes:
    try:
        return load_key(key_path(path), run_dir, create=False)
    except AuditError as error:
        raise click.ClickException(str(error)) from None


@click.group()
def audit():
    """Check and summarise a run's audit trail (audit.jsonl)."""


@audit.command("verify")
@click.argument("run_dir", type=_RUN_DIR)
@_KEY
def verify_command(run_dir, key):
    """Check the chain, the HMACs and the signed head, the run the trail belongs to, and each checkpoint the run
    resumed from against its source run's trail; name the first record edited, removed, reordered, inserted or cut
    off. Exit 0 only for an intact trail; 2 for a trail the guardian closed after its launcher was killed."""
    verdict = verify(run_dir, _key(key, run_dir))
    if verdict.ok:
        click.echo(f"{run_dir}: {verdict.message}")
        return
    if verdict.incomplete:
        click.echo(f"{run_dir}: {verdict.message}", err=True)
        raise SystemExit(2)
    click.echo(f"{run_dir}: FAILED: {verdict.message}", err=True)
    raise SystemExit(1)


@audit.command("report")
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report to this file [default: stdout].",
)
@click.option("--format", "fmt", type=click.Choice(["md", "html"]), default="md", show_default=True)
@_KEY
def report_command(run_dir, output, fmt, key):
    """A readable summary of the run for a reviewer, with the verification result."""
    text = render(run_dir, verify(run_dir, _key(key, run_dir)), fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}")
