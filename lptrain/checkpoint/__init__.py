"""The run directory and what a run resumes from: atomic, verified checkpoints (store.py),
their SHA-256 manifests (manifest.py), the run's own files (rundir.py), the resume decision
and its config-change rules (resume.py), and resuming on another world size (elastic.py).
"""

from lptrain.checkpoint.store import Found, Progress, newest_verified, verify

__all__ = ["Found", "Progress", "newest_verified", "verify"]
