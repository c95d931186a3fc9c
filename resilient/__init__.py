"""Resilience middleware for Python services."""
