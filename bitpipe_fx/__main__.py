"""``python -m bitpipe_fx``: the same as the ``bitpipe-fx`` console script."""

import sys

from bitpipe_fx.cli import main

sys.exit(main())
