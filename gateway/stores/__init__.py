"""Where shared state lives: the embedded memory store (one process) or Redis (issues to come)."""

from gateway.stores.base import Store
from gateway.stores.memory import MemoryStore

__all__ = ["MemoryStore", "Store"]
