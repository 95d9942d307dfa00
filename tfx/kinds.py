"""What each attention kind and position scheme supports, and which recipe combinations work.

`problems(recipe)` is checked with every recipe (`tfx recipe check`, `tfx train`), so an
impossible combination is refused with its reason before any model is built; `support_rows`
feeds `tfx recipe kinds`.
"""
from __future__ import annotations

import inspect

from tfx.families import FAMILY, family_of
from tfx.nn.positions import PositionScheme
from tfx.registry import ATTENTION, MEMORY, POSITION


def summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def position_needs(pos_cls) -> list[str]:
    """Kernel capabilities a position scheme relies on."""
    return [flag for flag, need in (("supports_bias", pos_cls.uses_bias),
                                    ("supports_score_mods", pos_cls.needs_score_mods)) if need]


def works_with(kernel_cls, pos_cls) -> bool:
    if getattr(kernel_cls, "needs_relative", False) and not pos_cls.relative:  # lm_infinite caps distances
        return False
    return all(getattr(kernel_cls, flag) for flag in position_needs(pos_cls))


def problems(recipe) -> list[str]:
    """Every reason the recipe's attention kind(s), position scheme and family cannot run together."""
    m = recipe.model
    pos = POSITION.get(m.position.kind)
    family = family_of(recipe)
    out: list[str] = []
    for att in m.attention_layers or [m.attention]:  # every layer's kind, when they differ
        out.extend(msg for msg in attention_problems(recipe, att, family, pos) if msg not in out)
    if not family.images and pos.images_only:
        out.append(f"model.position.kind: {m.position.kind!r} places positions on a grid of image patches; a "
                   f"{recipe.family} model reads text (1-D schemes: learned, sinusoidal, rope, ...)")
    if m.block == "simplified" and any(s.cross for s in family.stacks):
        out.append(f"model.block: 'simplified' has no cross-attention sublayer, which the {recipe.family} "
                   "decoder needs (He & Hofmann define decoder-only and encoder-only blocks)")
    if m.depth.kind == "universal" and m.memory.kind != "none":
        out.append(f"[model.depth] kind = 'universal' repeats the blocks in depth; a segment memory ({m.memory.kind!r}) "
                   "keeps one state per layer, which is not built for it")
    if m.reversible:
        from tfx.nn.reversible import reversible_problems

        out.extend(reversible_problems(recipe, pos))
    if m.ffn_chunks > 1 and m.ffn == "dwconv":
        out.append("model.ffn_chunks: 'dwconv' mixes neighbouring positions across the chunks' borders; use gelu, "
                   "relu or swiglu, or ffn_chunks = 1")
    if m.stem and not family.images:
        out.append(f"model.stem: a convolution over image pixels; a {recipe.family} model reads text "
                   f"(use it with family = \"{_families_with('images')}\")")
    if m.ffn == "dwconv" and m.memory.kind != "none":
        out.append(f"model.ffn: 'dwconv' mixes neighbouring positions, which a segment memory "
                   f"({m.memory.kind!r}) does not keep across segments; use gelu, relu or swiglu")
    if recipe.data.blocks != "auto" and not family.blocks:
        out.append(f"data.blocks: {recipe.data.blocks!r} is for the {_families_with('blocks')} family "
                   f"(it orders an LM's training blocks)")
    from tfx.models.megabyte import patches_problems
    from tfx.nn.early_exit import exit_problems
    from tfx.nn.memory import memory_problems

    out.extend(exit_problems(recipe, family))
    out.extend(patches_problems(recipe, family))

    out.extend(memory_problems(recipe))
    if m.memory.kind != "none" and not family.memory:
        out.append(f"model.memory.kind: {m.memory.kind!r} is for the {_families_with('memory')} family")
    return out


def attention_problems(recipe, att, family, pos) -> list[str]:
    """Why one attention table `att` (the model's, or one layer's) cannot run in this recipe."""
    m = recipe.model
    kind, position = att.kind, m.position.kind
    kernel = ATTENTION.get(kind)
    out = []
    for stack, causal, padded in ((s.name, s.causal, s.padded) for s in family.stacks):
        where = f"the {recipe.family} {stack}" if len(family.stacks) > 1 else f"a {recipe.family} model"
        if causal and not kernel.supports_causal:
            out.append(f"model.attention.kind: {kind!r} cannot be causal, as {where} needs "
                       f"(it mixes every position into every output)")
        if not causal and not kernel.supports_bidirectional:
            out.append(f"model.attention.kind: {kind!r} is causal only; {where} attends both ways")
        if padded and not kernel.supports_padding:
            out.append(f"model.attention.kind: {kind!r} cannot mask padding, which {where} has")
    if pos.uses_bias and not kernel.supports_bias:
        out.append(f"model.position.kind: {position!r} adds a bias to the attention scores, which "
                   f"{kind!r} never forms; use a position scheme without a bias (rope, sinusoidal, learned, none)")
    if pos.needs_score_mods and not kernel.supports_score_mods:
        out.append(f"model.position.kind: {position!r} needs the attention weights themselves "
                   f"(relative values or distance scaling), which only the dense kernel materialises")
    if not family.images and getattr(kernel, "needs_grid", False):
        out.append(f"model.attention.kind: {kind!r} works on a grid of image patches; a {recipe.family} model "
                   f"reads text (use it with family = \"{_families_with('images')}\")")
    if m.block == "simplified":
        from tfx.nn.simplified import simplified_problems

        out.extend(simplified_problems(recipe, att, kernel, pos))
    check = getattr(kernel, "check_recipe", None)
    if check is not None:
        out.extend(f"model.attention: {msg}" for msg in check(att, m))
    return out


def _families_with(flag: str) -> str:
    """The families whose record sets `flag`, for messages ("lm", "lm or vit")."""
    return " or ".join(n for n in FAMILY.names() if getattr(FAMILY.get(n), flag))


def attention_rows() -> list[dict]:
    rows = []
    for name in ATTENTION.names():
        cls = ATTENTION.get(name)
        rows.append({
            "kind": name, "exact": cls.exact, "causal": cls.supports_causal,
            "bidirectional": cls.supports_bidirectional, "cache": cls.supports_cache, "bias": cls.supports_bias,
            "padding": cls.supports_padding, "complexity": cls.complexity,
            "positions": [p for p in POSITION.names() if works_with(cls, POSITION.get(p))],
            "about": summary(cls),
        })
    return rows


def memory_rows() -> list[dict]:
    every = list(FAMILY.names())
    return [{"kind": name, "families": [f for f in every if FAMILY.get(f).memory] if name != "none" else every,
             "needs": MEMORY.get(name).needs, "about": summary(MEMORY.get(name))} for name in MEMORY.names()]


def position_rows() -> list[dict]:
    rows = []
    for name in POSITION.names():
        cls = POSITION.get(name)
        hooks = [h for h in ("embed", "rotate", "bias", "adjust") if getattr(cls, h) is not getattr(PositionScheme, h)]
        rows.append({
            "kind": name, "hooks": hooks, "extrapolates": cls.extrapolates, "needs": position_needs(cls),
            "attention": [k for k in ATTENTION.names() if works_with(ATTENTION.get(k), cls)],
            "about": summary(cls),
        })
    return rows
