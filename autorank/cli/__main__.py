"""``python -m autorank.cli``."""

from autorank.cli import entry

entry()
