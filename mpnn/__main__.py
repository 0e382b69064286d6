"""`python -m mpnn ...` is the `mpnn` command."""

from mpnn.cli import main

main(prog_name="mpnn")
