"""lptrain.optim: AdamW with compact moments and BF16 master weights (algorithms.md §10).

Public API: CompactAdamW, STATE_FORMATS, MASTERS, adamw_reference.
"""

from lptrain.optim.adamw import MASTERS, CompactAdamW
from lptrain.optim.states import STATE_FORMATS

__all__ = ["MASTERS", "STATE_FORMATS", "CompactAdamW"]
