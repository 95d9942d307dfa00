"""Memory kinds (`model.memory.kind`), one file each; importing the package registers them all.

- `none` (base.py): every sequence stands alone;
- `xl` (xl.py): Transformer-XL recurrence (Dai et al., 2019);
- `compressive` (compressive.py): the Compressive Transformer (Rae et al., 2019);
- `memorizing` (memorizing.py): the Memorizing Transformer's kNN store (Wu et al., 2022);
- `rmt` (rmt.py): the Recurrent Memory Transformer's memory tokens (Bulatov et al., 2022);
- `spalm` (spalm.py): SPALM's XL memory plus gated kNN neighbour tokens (Yogatama et al., 2021).

sinks.py holds the StreamingLLM sink cache (Xiao et al., 2023), a generation-time state rather
than a recipe kind. Adding a memory kind is one file here: its config, its State type (a
MemoryState dataclass: reorder, save, restore) and its module registered in MEMORY, with
new_state / memories / hooks / carry as base.py describes; then import it below.
"""
from tfx.nn.memory import base, xl, compressive, memorizing, rmt, sinks, spalm  # noqa: F401  (registration order)
from tfx.nn.memory.base import memory_problems, relative_positions  # noqa: F401
