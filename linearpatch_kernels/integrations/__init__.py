"""Integrations with serving engines; each is imported only when that engine loads it."""
