"""``python -m spectralmc_server.cli``: the ``spectralmc`` command."""

import sys

from spectralmc_server.cli import main

sys.exit(main())
