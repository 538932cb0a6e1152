"""``python -m resolver``: the same as the ``resolver`` console script."""

import sys

from resolver.cli import main

sys.exit(main())
