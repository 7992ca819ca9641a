"""`python -m lomotune` (and `torchrun -m lomotune`): the CLI."""

from lomotune.cli import main

main()
