"""Reward functions: a registry of rule rewards, user functions by "file.py:fn", parallel scoring."""
