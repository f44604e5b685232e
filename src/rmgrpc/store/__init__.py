"""Persistence: objects and the event log in SQLite, written by group commit.

The store is generic: it keeps opaque encoded objects by (kind, id) and the append-only
event log; the engine decides what they mean.
"""

from rmgrpc.store.schema import SCHEMA_VERSION
from rmgrpc.store.sqlite import LoadedState, Store, StoreError, Write

__all__ = ["SCHEMA_VERSION", "LoadedState", "Store", "StoreError", "Write"]
