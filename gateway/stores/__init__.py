"""Where shared state lives: the embedded memory store (one process) or Redis."""

from typing import Any

from gateway.stores.base import Hit, Outcome, Store
from gateway.stores.memory import MemoryStore

__all__ = ["Hit", "MemoryStore", "Outcome", "Store", "make_store"]


def make_store(config: Any) -> Store:
    """The store the config asks for: Redis when a `redis:` block is given, else memory."""
    if config.redis is None:
        return MemoryStore()
    from gateway.stores.redis import RedisStore  # redis-py is loaded only when used

    return RedisStore(config.redis)
