"""Megatron-style model parallelism: process groups, collectives, TP layers, pipeline schedules.

Depends on torch and the standard library only (the import directions are checked by tests/test_imports.py).
"""

from parallel.groups import ProcessGroups, check_degrees, rank_grid

__all__ = ["ProcessGroups", "check_degrees", "rank_grid"]
