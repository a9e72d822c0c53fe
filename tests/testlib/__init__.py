"""Shared helpers for the test suite (importable as ``testlib`` from spawned ranks too)."""
