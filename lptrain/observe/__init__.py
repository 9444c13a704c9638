"""Watching a run's numerics: per-layer quantization statistics (layers.py), gradient norms and
update ratios (weights.py), gradient fidelity on a probe batch (fidelity.py), loss spikes
(spikes.py), the precision guard (guard.py), step time / MFU / memory (perf.py), tied together
around each step by `Monitoring` (runner.py). The rows and events go through metrics.py.
"""

from lptrain.observe.runner import Monitoring, Plan, check, check_model

__all__ = ["Monitoring", "Plan", "check", "check_model"]
