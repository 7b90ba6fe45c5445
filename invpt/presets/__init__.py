"""Shipped config presets (YAML)."""
