"""Logging, timers, progress."""
