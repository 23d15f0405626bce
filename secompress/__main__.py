"""``python -m secompress ...``: the command line (:mod:`secompress.cli`)."""
import sys

from .cli import main

sys.exit(main())
