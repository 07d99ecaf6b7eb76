"""Accuracy of the bundled heston model against COS on the analytic CF, and its speed
side by side with QuantLib (see bench/accuracy_models.py for the method).

    python bench/accuracy_heston.py --record        # full run, writes docs/
    python bench/accuracy_heston.py --quick         # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_models import run


def main(argv: list[str] | None = None) -> int:
    return run("heston", argv)


if __name__ == "__main__":
    sys.exit(main())
