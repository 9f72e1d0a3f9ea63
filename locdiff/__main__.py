"""`python -m locdiff ...`: the same as the `locdiff` command."""

import sys

from locdiff.cli import main

sys.exit(main())
