"""The ``specquant`` command: ``demo``, ``quantize``, ``eval``, ``analyze``.

Contract (README.md, "The command line on the real models"): ``--json`` prints exactly one JSON
object on stdout and nothing else goes to stdout; human tables, status lines and progress bars go
to stderr (progress bars only when stderr is a terminal, never with ``--quiet``). Every error is
one line on stderr, ``specquant: error: ...``, with exit status 2 and no traceback
(``SPECQUANT_DEBUG=1`` re-raises unexpected errors with their traceback).

This package only parses arguments and wires the library together: the library itself never
reads command-line arguments. ``main.py`` runs a command and maps errors to exit statuses,
``parser.py`` builds the parser, ``quantize.py``, ``demo.py``, ``eval.py`` and ``analyze.py`` hold
one command each, ``common.py`` what they share. Only :func:`main` is exported here.
"""
from specquant.cli.main import main

__all__ = ["main"]
