"""One small registry shared by models, neurons, encoders and surrogates.

Why one class: every family is looked up the same way (by name, with a helpful error naming
the registered choices), so configs can validate names up front and tests can iterate over
everything that is registered.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown name in a registry; the message lists what is available."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> factory map with decorator registration and fnmatch listing."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._tags: dict[str, frozenset[str]] = {}

    def register(
        self, name: str | None = None, *, tags: tuple[str, ...] = ()
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@MODELS.register("lenet_asnn", tags=("tiny",))``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            self._tags[key] = frozenset(tags)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def create(self, name: str, /, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*", tag: str | None = None) -> list[str]:
        return sorted(
            n
            for n in self._entries
            if fnmatch.fnmatch(n, pattern) and (tag is None or tag in self._tags[n])
        )

    def keywords(self, name: str) -> Optional[list[str]]:
        """Keyword arguments the factory ``name`` accepts, so configs can check them up front.

        A factory that takes ``**kwargs`` and passes them to the class it returns (annotated
        ``-> Class``) accepts that class's ``__init__`` keywords; None when they cannot be known.
        """
        fn: Any = self.get(name)
        for _ in range(2):  # the factory, then the class its return annotation names
            params = inspect.signature(fn).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return sorted(names)
            try:
                target = typing.get_type_hints(fn).get("return")
            except Exception:  # noqa: BLE001 (an unresolvable annotation: keys cannot be checked)
                return None
            if not isinstance(target, type):
                return None
            fn = target
        return None

    def tags(self, name: str) -> frozenset[str]:
        self.get(name)
        return self._tags[name]

    def unknown_message(self, name: str) -> str:
        choices = self.names()
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(choices) or 'none'}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Any] = Registry("model")
NEURONS: Registry[Any] = Registry("neuron")
ENCODERS: Registry[Any] = Registry("encoder")
SURROGATES: Registry[Any] = Registry("surrogate")


def _load_builtin() -> None:
    """Import the modules whose decorators fill the registries (idempotent)."""
    import asnn_dist.models  # noqa: F401
    import asnn_dist.snn  # noqa: F401


def create_model(name: str, /, **kwargs: Any) -> Any:
    _load_builtin()
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    _load_builtin()
    return MODELS.names(pattern, tag)
