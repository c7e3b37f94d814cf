"""`python -m simulators`: the same as `linectl sim`."""

import sys

from simulators.cli import main

sys.exit(main())
