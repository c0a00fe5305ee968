"""``python -m autotp``: the command line (see ``autotp.tools.cli``)."""
import sys

from autotp.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
