"""Operator scripts that run from a checkout (not installed with the package)."""
