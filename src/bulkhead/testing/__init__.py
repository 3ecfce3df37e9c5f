"""Test support that ships with the package (fixtures for our own suite and for extensions)."""
