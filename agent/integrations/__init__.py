"""Thin adapters over the one agent core for launchers and frameworks (each framework optional)."""
