"""`python -m fastsel ...` runs the command line."""

import sys

from fastsel.cli import main

sys.exit(main())
