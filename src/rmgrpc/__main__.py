"""`python -m rmgrpc` is the `rmgrpc` command."""

import sys

from rmgrpc.cli import main

sys.exit(main())
