"""`python -m linectl ...`: the same as the `linectl` console script."""

from linectl.cli import main

raise SystemExit(main())
