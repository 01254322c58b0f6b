"""Helpers shared by several test modules, one copy each."""
