"""Deterministic demo data shared by the Feast repo generator and the model trainer."""
