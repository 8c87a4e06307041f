"""`python -m fewstep` = the `fewstep` command."""

import sys

from fewstep.cli import main

if __name__ == "__main__":
    sys.exit(main())
