"""``python -m vimodels.cli``: the ``vimodels`` command."""

import sys

from vimodels.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
