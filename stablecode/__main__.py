"""`python -m stablecode ...`: the `stablecode` command."""

import sys

from stablecode.cli import main

sys.exit(main())
