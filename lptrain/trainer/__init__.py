"""The training loop: build, resume, step, evaluate, checkpoint, stop on a signal (loop.py);
one optimizer step (step.py) or bit switching's multi-bit-width step (bitswitch.py);
SIGTERM / SIGINT handling (stop.py).
"""

from lptrain.trainer.loop import NonFiniteError, run, setup
from lptrain.trainer.step import StepResult, train_step
from lptrain.trainer.stop import Interrupted, Signals

__all__ = ["Interrupted", "NonFiniteError", "Signals", "StepResult", "run", "setup", "train_step"]
