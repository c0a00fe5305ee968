"""``python -m autotp``: the command line (see ``autotp.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
