"""Name -> factory registries for datasets, models and losses (timm's ``register_model`` shape).

Every registered name is part of the test matrix: tests iterate over ``names()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from orchestrator.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A decorator registry whose lookup errors say which names exist."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise UserError(f"{self.field}: unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._factories[name]

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)
