"""``python -m hivefold``: the same as the ``hivefold`` command."""

import sys

from hivefold.cli import main

if __name__ == "__main__":
    sys.exit(main())
