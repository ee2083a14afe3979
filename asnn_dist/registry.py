"""One small registry shared by models, neurons, encoders and surrogates.

Why one class: every family is looked up the same way (by name, with a helpful error naming
the registered choices), so configs can validate names up front and tests can iterate over
everything that is registered.

Layering: this module imports nothing of asnn_dist. Each registry names its ``home``, the
package whose import fills it (``asnn_dist.models``, ``asnn_dist.snn``), imported on the first
lookup. Models are *declared* there (``Registry.declare``: name -> "module:Class", the
defaults of that size, the keywords it takes) without importing torch, so ``config check``
validates model names and options in milliseconds; the class's module is imported only when
a model is built.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown name in a registry; the message lists what is available."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Declared:
    """A registry entry known by import path: ``target`` ("module:attr") called with
    ``defaults`` (then the caller's keywords); ``keywords`` it accepts, known without import."""

    target: str
    keywords: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.target.partition(":")
        return functools.partial(getattr(importlib.import_module(module), attr), **self.defaults)


class Registry(Generic[T]):
    """Name -> factory map with decorator registration, lazy declarations and fnmatch listing."""

    def __init__(self, kind: str, home: Optional[str] = None) -> None:
        self.kind = kind
        self.home = home
        self._entries: dict[str, Callable[..., T] | Declared] = {}
        self._tags: dict[str, frozenset[str]] = {}

    def _load_home(self) -> None:
        """Import the package that fills this registry, once (its import may look names up)."""
        home, self.home = self.home, None
        if home:
            try:
                importlib.import_module(home)
            except BaseException:
                self.home = home
                raise

    def _add(self, key: str, entry: Callable[..., T] | Declared, tags: Sequence[str]) -> None:
        if key in self._entries and self._entries[key] != entry:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[key] = entry
        self._tags[key] = frozenset(tags)

    def register(
        self, name: str | None = None, *, tags: tuple[str, ...] = ()
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@NEURONS.register("lif")``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            self._add(name or fn.__name__, fn, tags)
            return fn

        return deco

    def declare(
        self, name: str, target: str, keywords: Sequence[str], *, tags: Sequence[str] = (), **defaults: Any
    ) -> None:
        """Register ``name`` as ``target`` ("module:Class") with ``defaults``, importing nothing:
        ``keywords`` (the class's, checked against it by the tests) let configs validate options."""
        unknown = set(defaults) - set(keywords)
        if unknown:
            raise ValueError(f"{self.kind} {name!r}: defaults {sorted(unknown)} are not keywords of {target}")
        self._add(name, Declared(target, tuple(sorted(keywords)), dict(defaults)), tags)

    def get(self, name: str) -> Callable[..., T]:
        self._load_home()
        try:
            entry = self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None
        return entry.load() if isinstance(entry, Declared) else entry

    def declaration(self, name: str) -> Optional[Declared]:
        """Where a declared ``name`` lives (None for a registered factory), without importing it."""
        self._load_home()
        entry = self._entries.get(name)
        return entry if isinstance(entry, Declared) else None

    def create(self, name: str, /, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*", tag: str | None = None) -> list[str]:
        self._load_home()
        return sorted(
            n
            for n in self._entries
            if fnmatch.fnmatch(n, pattern) and (tag is None or tag in self._tags[n])
        )

    def keywords(self, name: str) -> Optional[list[str]]:
        """Keyword arguments the factory ``name`` accepts, so configs can check them up front.

        A declared entry lists them itself (no import). For a registered factory they come from
        its signature; one that takes ``**kwargs`` and passes them to the class it returns
        (annotated ``-> Class``) accepts that class's keywords. None when they cannot be known.
        """
        declared = self.declaration(name)
        if declared is not None:
            return list(declared.keywords)
        fn: Any = self.get(name)
        names = signature_keywords(fn)
        if names is not None:
            return names
        try:
            target = typing.get_type_hints(fn).get("return")
        except Exception:  # noqa: BLE001 (an unresolvable annotation: keys cannot be checked)
            return None
        return signature_keywords(target) if isinstance(target, type) else None

    def tags(self, name: str) -> frozenset[str]:
        if name not in self:
            raise RegistryError(self.unknown_message(name))
        return self._tags[name]

    def unknown_message(self, name: str) -> str:
        choices = self.names()
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(choices) or 'none'}"

    def __contains__(self, name: object) -> bool:
        self._load_home()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_home()
        return len(self._entries)


def signature_keywords(fn: Callable[..., Any]) -> Optional[list[str]]:
    """Keywords ``fn`` accepts. A class whose ``__init__`` takes ``**kwargs`` passes them to its
    base (``super().__init__(**kwargs)``), so the bases' keywords count too, up the MRO;
    None for a plain function taking ``**kwargs``."""
    names: set[str] = set()
    chain = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if isinstance(fn, type) else [fn]
    for f in chain:
        params = inspect.signature(f).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return sorted(names - {"self"})
    return None


MODELS: Registry[Any] = Registry("model", home="asnn_dist.models")
NEURONS: Registry[Any] = Registry("neuron", home="asnn_dist.snn")
ENCODERS: Registry[Any] = Registry("encoder", home="asnn_dist.snn")
SURROGATES: Registry[Any] = Registry("surrogate", home="asnn_dist.snn")


def create_model(name: str, /, **kwargs: Any) -> Any:
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    return MODELS.names(pattern, tag)
