"""``python -m specquant.cli``: the ``specquant`` command."""
import sys

from specquant.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
