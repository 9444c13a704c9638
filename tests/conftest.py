"""Session-wide test set-up, loaded before any test module is imported.

Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton decides that when
it is first imported and when kernels are decorated, and other test modules' imports
(transformers, peft, torch's compiler stack) may import Triton early, so the choice is made
here, first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
