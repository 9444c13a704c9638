"""`python -m lptrain ...` is the `lptrain` console script."""

import sys

from lptrain.cli import main

sys.exit(main())
