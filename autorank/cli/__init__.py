"""The ``autorank`` command.

Errors a user can cause print one line (``error: ...``) and exit with code 2;
``--debug`` shows the traceback instead. The commands live in
:mod:`autorank.cli.library` (methods, plan, profile, decompose) and
:mod:`autorank.cli.search` (search, front, export); what they share in
:mod:`autorank.cli.common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from autorank._version import __version__
from autorank.cli import library, search
from autorank.cli.common import EXIT_USAGE
from autorank.errors import AutorankError
from autorank.fileio import disk_full_error

__all__ = ["main", "build_parser", "entry"]


def build_parser() -> argparse.ArgumentParser:
    """The ``autorank`` argument parser with every command."""
    p = argparse.ArgumentParser(
        prog="autorank",
        description="Low-rank compression of PyTorch models: per-layer method and rank.",
        epilog=library.EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"autorank {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    library.add_commands(sub)
    search.add_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except AutorankError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk met outside autorank's own writers (a library's): still one line
        full = disk_full_error(exc, getattr(exc, "filename", None) or ".")
        if full is None or args.debug:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # console script
    sys.exit(main())
