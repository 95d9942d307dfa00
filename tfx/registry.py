"""Short-name registries: each kind of attention, position, tokenizer, ... registers itself here.

A recipe table with a ``kind`` key is resolved through the registry of its slot: the kind picks
the class and its own pydantic config model, so every kind validates exactly its own parameters.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, create_model

T = TypeVar("T")


class KindConfig(BaseModel):
    """Base of every kind's parameter model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


def closest(name: str, names: list[str]) -> str | None:
    """The most similar valid name, for 'did you mean' hints."""
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return match[0] if match else None


class Registry(Generic[T]):
    """Maps a short name to a class (or builder) and the config model of its parameters."""

    def __init__(self, slot: str):
        self.slot = slot
        self._entries: dict[str, tuple[Any, type[KindConfig]]] = {}

    def register(self, name: str, *, config: type[KindConfig] = KindConfig) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.slot} kind {name!r} registered twice")
            # Pin `kind` to this name so a tagged union can dispatch on it.
            tagged = create_model(
                f"{self.slot}.{name}", __base__=config, kind=(Literal[name], name)  # type: ignore[valid-type]
            )
            self._entries[name] = (obj, tagged)
            return obj

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        return self._entries[name][0]

    def config_model(self, name: str) -> type[KindConfig]:
        return self._entries[name][1]

    def unknown_message(self, name: str) -> str:
        hint = closest(name, self.names())
        msg = f"unknown {self.slot} kind {name!r}; allowed: {', '.join(self.names())}"
        return msg + (f" (did you mean {hint!r}?)" if hint else "")

    def build(self, cfg: KindConfig, **kwargs: Any) -> Any:
        """Instantiate the registered class of ``cfg.kind`` with its config and extra arguments."""
        return self.get(cfg.kind)(cfg, **kwargs)


ATTENTION: Registry = Registry("attention")
POSITION: Registry = Registry("position")
TOKENIZER: Registry = Registry("tokenizer")
OPTIMIZER: Registry = Registry("optimizer")
SCHEDULE: Registry = Registry("schedule")
MEMORY: Registry = Registry("memory")
