"""A pydantic validation error of a recipe as one line a user can act on: the key, what is wrong and what
is allowed (unknown keys with the allowed ones and the closest, unknown kinds with the registry's names)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tfx.registry import ATTENTION, MEMORY, OPTIMIZER, POSITION, SCHEDULE, TOKENIZER, closest


def _element(annotation: Any) -> Any:
    """`X | None` -> X; `list[X]` -> X (the type an item of the field has)."""
    args = getattr(annotation, "__args__", ())
    if type(None) in args and len(args) == 2:
        annotation = next(a for a in args if a is not type(None))
    if getattr(annotation, "__origin__", None) is list:
        annotation = annotation.__args__[0]
    return annotation


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (for 'allowed keys' hints)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(cls, dict):
            cls = cls.get(part)
            continue
        if isinstance(part, int):  # an item of a list field: its element type came before
            continue
        fields = getattr(cls, "model_fields", None)
        if fields is None:
            return None
        if part in fields:
            cls = _element(fields[part].annotation)
            args = [a for a in getattr(cls, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if args and not isinstance(cls, type):  # a tagged union: the tag comes next in loc
                cls = {a.model_fields["kind"].default: a for a in args}
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def explain(err: dict, root: type[BaseModel], raw: dict) -> str:
    loc = tuple(err["loc"])
    # Drop the union tag pydantic inserts in the path (model.attention.dense.window -> ...window).
    path, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(str(part))
            node = node[part]
        elif isinstance(node, dict) and node.get("kind") == part:
            continue
        else:
            path.append(str(part))
            node = None
    key = ".".join(path) or "(recipe)"
    if "attention_layers" in path[:-2]:  # a per-layer table (tfx/config_layers.py): name the layer and kind
        i = path.index("attention_layers")
        key = ".".join(path[:i] + ["attention"] + path[i + 3:]) + f" (layer {path[i + 1]}, a {path[i + 2]} layer)"
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(root, loc)
        allowed = sorted(owner.model_fields) if owner else []
        hint = closest(str(loc[-1]), allowed)
        msg = f"unknown key {key!r}"
        if allowed:
            msg += f"; allowed keys here: {', '.join(allowed)}"
        return msg + (f" (did you mean {hint!r}?)" if hint else "")
    if kind in ("union_tag_invalid", "literal_error") and (loc[-1] == "kind" or kind == "union_tag_invalid"):
        value = err["ctx"].get("tag", err.get("input"))
        slot = {"attention": ATTENTION, "position": POSITION, "tokenizer": TOKENIZER, "src_tokenizer": TOKENIZER,
                "memory": MEMORY, "optimizer": OPTIMIZER, "schedule": SCHEDULE}.get(path[-2] if loc[-1] == "kind" else path[-1])
        if slot is not None:
            return f"{key if key.endswith('kind') else key + '.kind'}: {slot.unknown_message(str(value))}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"
