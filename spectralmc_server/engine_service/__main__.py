"""``python -m spectralmc_server.engine_service --fd N``: the engine process (server.py)."""

import sys

from spectralmc_server.engine_service.server import main

sys.exit(main())
