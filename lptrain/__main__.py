"""`python -m lptrain ...` is the `lptrain` console script."""

import sys

from lptrain.train.cli import main

sys.exit(main())
