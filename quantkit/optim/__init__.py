"""Optimizers with 8-bit states: :class:`AdamW8bit`, :class:`Adam8bit`; safetensors state files.

::

    from quantkit.optim import AdamW8bit, save_optimizer_state, load_optimizer_state

See docs/DESIGN.md section 7 for the arithmetic (reference: ``quantkit.reference.adamw8bit_step``).
"""

from .adamw8bit import Adam8bit, AdamW8bit
from .state_file import load_optimizer_state, save_optimizer_state

__all__ = ["Adam8bit", "AdamW8bit", "load_optimizer_state", "save_optimizer_state"]
