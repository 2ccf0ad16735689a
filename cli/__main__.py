"""`python -m gradwatch.cli`: what the tests and the demo start, the same as the `gradwatch` script."""

import sys

from .main import main

sys.exit(main())
