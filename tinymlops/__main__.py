"""``python -m tinymlops`` runs the CLI."""

from tinymlops.cli import main

main()
