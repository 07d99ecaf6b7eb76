"""SpectralMC server: learned characteristic functions, priced with the COS method."""

from __future__ import annotations

__version__ = "0.1.0"
