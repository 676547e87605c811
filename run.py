"""Start EasyBackend: ``python run.py [--demo] [flags]`` (same as the ``easybackend`` command)."""

import sys

from easybackend.cli import main

if __name__ == "__main__":
    sys.exit(main())
