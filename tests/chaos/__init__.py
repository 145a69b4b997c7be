"""Crash-and-fault scenarios with real processes (``./run chaos``); see conftest.py."""
