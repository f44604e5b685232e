"""Persistence: objects and the event log in SQLite, written by group commit.

The store is generic: it keeps opaque encoded objects by (kind, id) and the append-only
event log; the engine decides what they mean. `EventStore` is the contract, `Store` the
SQLite implementation.
"""

from rmgrpc.store.protocol import EventStore, LoadedState, OnCommit, StoreError, Write
from rmgrpc.store.schema import SCHEMA_VERSION
from rmgrpc.store.sqlite import Store

__all__ = [
    "SCHEMA_VERSION",
    "EventStore",
    "LoadedState",
    "OnCommit",
    "Store",
    "StoreError",
    "Write",
]
