"""The HTTP service: registration, health, metrics and the admin endpoints."""
