"""Development and test helpers that are not part of the served package (never installed:
pyproject's package list is ``spectralmc_server*``). Importable from the repository root,
which pytest puts on ``sys.path`` (pyproject's ``pythonpath``) and bench scripts add."""
