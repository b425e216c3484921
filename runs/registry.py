"""A name -> function registry with a decorator, as timm does for models.

    MODELS = Registry("model")

    @MODELS.register
    def resnet18(...): ...

    MODELS.get("resnet9")  # UserError: unknown model 'resnet9'; valid: resnet18, ...
"""

from collections.abc import Callable

from runs.errors import unknown


class Registry:
    """Maps names to callables; the function's own name is its registered name."""

    def __init__(self, kind: str):
        self.kind = kind  # what the names are, for error messages: "model", "dataset", ...
        self._entries: dict[str, Callable] = {}

    def register(self, fn: Callable = None, *, name: str = None):
        def add(fn):
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._entries[key] = fn
            return fn

        return add(fn) if fn is not None else add

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
