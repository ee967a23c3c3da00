"""Losses of st-viomni, imported as ``st_viomni.losses``."""
