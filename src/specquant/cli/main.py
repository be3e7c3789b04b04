"""``main(argv)``: parse the arguments, run the command, and turn every error into one line on
stderr with exit status 2 (130 on Ctrl-C)."""
from __future__ import annotations

import logging
import os
import sys

from specquant.cli.common import PROG, CLIError
from specquant.cli.parser import build_parser
from specquant.models.data import ENV_VAR, DataNotFoundError

DEBUG_ENV = "SPECQUANT_DEBUG"


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specquant`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
        args = build_parser().parse_args(head)
        if tail is not None:  # options handed on to another command (specquant sweep ... -- QUANTIZE OPTIONS)
            if not hasattr(args, "passthrough"):
                raise CLIError(f"{args.command}: unexpected '--' (only sweep passes options on to quantize)")
            args.passthrough = tail
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                            format="%(message)s")
        return args.func(args, argv)
    except CLIError as e:
        return _fail(_one_line(e))
    except DataNotFoundError as e:
        msg = _one_line(e)
        if ENV_VAR not in msg and "--data-dir" not in msg:
            msg += f" (the data directory is set by --data-dir or {ENV_VAR})"
        return _fail(msg)
    except (ValueError, OSError) as e:
        if debug:
            raise
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - no traceback for users; SPECQUANT_DEBUG=1 shows it
        if debug:
            raise
        return _fail(f"internal error ({type(e).__name__}): {_one_line(e)} (set {DEBUG_ENV}=1 for the traceback)")
