"""``python -m hasentinel``: the same entry point as the ``hasentinel`` command."""

import sys

from hasentinel.cli import main

sys.exit(main())
