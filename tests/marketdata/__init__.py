"""Market-data tests (a package: tests/store has a test_objects.py too)."""
