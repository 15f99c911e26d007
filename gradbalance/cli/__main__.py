"""``python -m gradbalance.cli``: the same as the ``gradbalance`` command."""

import sys

from gradbalance.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
