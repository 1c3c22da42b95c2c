"""python -m cuflash: the `cuflash` command (see cuflash/_cli.py)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
