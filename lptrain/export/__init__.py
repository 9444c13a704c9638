"""A trained model outside the trainer: the deploy fold (folding.py, public as `fold`), the
`lptrain export` writer (write.py), rebuilding a run or an export without DeepSpeed
(restore.py), `lptrain eval` (evaluate.py) and `lptrain switch` (switch.py).
"""

from lptrain.export.folding import fold
from lptrain.export.restore import Opened, open_any, open_export, open_run

__all__ = ["Opened", "fold", "open_any", "open_export", "open_run"]
