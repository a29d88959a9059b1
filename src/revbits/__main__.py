"""``python -m revbits ...``: the ``revbits`` command line."""

import sys

from .cli import main

sys.exit(main())
