"""Loss-spike score, spike events and the divergence flag (algorithms.md §8.3).

score_t = (L_t - m) / s, with m and s^2 an exponential moving mean and variance of the losses
before step t (weight `ema` on the newest, or 1/n while fewer than 1/ema losses are in: the
bias-corrected start). The first `warmup` losses are left out: the fast initial drop is not the
run's normal noise, and folded in it would inflate s for hundreds of steps. The std has a floor
of 1e-3 * |m|: on a flat plateau s -> 0 and any wiggle would score as a spike. A spike starts
when the score exceeds `threshold` (with at least MIN_SEEN losses in the statistics); while it
lasts the statistics are frozen (the spike must not become the new normal), and it ends when
the score falls below threshold / 2. A spike that has not ended after `divergence` steps raises
the divergence flag, which stays raised.

The warmup is not blind: there the loss is held against an absolute `bound`, the loss of a
uniform guess over the vocabulary, ln(vocab_size). Once a loss has been at or below it, a loss
above it (worse than guessing) starts a spike, which ends when the loss is back at or below the
bound (a random initialization starts near ln V, so the first losses only arm the check). Non-
finite losses (skipped steps) are not scored; the
trainer reports them as events of their own. A slow climb is not a spike: watch
`stability/loss_ema` and the validation loss for that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lptrain.config.schema import SpikeConfig

STD_FLOOR = 1e-3
MIN_SEEN = 10  # losses in the statistics before a score can flag a spike


@dataclass
class SpikeState:
    mean: float = 0.0
    var: float = 0.0
    count: int = 0  # finite losses so far (the first `warmup` are not folded)
    seen: int = 0  # finite losses folded into mean/var
    spike_step: int | None = None  # start of the spike in progress
    spike_peak: float = 0.0
    diverged_at: int | None = None
    below_bound: bool = False  # a loss at or below the bound seen: the warmup check is armed
    bound_spike: bool = False  # the spike in progress was started by the bound (ends by it)


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig, bound: float = math.inf):
        """bound: the warmup's absolute loss bound, ln(vocab_size); inf: none."""
        self.cfg = cfg
        self.bound = bound
        self.state = SpikeState()
        self.score = float("nan")

    @property
    def diverged(self) -> bool:
        return self.state.diverged_at is not None

    def _score(self, loss: float) -> float:
        st = self.state
        if st.seen == 0:
            return float("nan")
        std = max(math.sqrt(st.var), STD_FLOOR * abs(st.mean))
        return (loss - st.mean) / std if std > 0 else 0.0

    def _fold(self, loss: float) -> None:
        st = self.state
        a = max(self.cfg.ema, 1.0 / (st.seen + 1))
        if st.seen == 0:
            st.mean = loss
        else:
            delta = loss - st.mean
            st.mean += a * delta
            st.var = (1 - a) * (st.var + a * delta * delta)
        st.seen += 1

    def update(self, step: int, loss: float) -> list[dict]:
        """Score this step's loss; returns the events it causes (spike, recovered, divergence)."""
        if not math.isfinite(loss):
            self.score = float("nan")
            return []
        st, cfg = self.state, self.cfg
        st.count += 1
        warm = st.count <= cfg.warmup
        self.score = score = float("nan") if warm else self._score(loss)
        if st.spike_step is None:
            if warm and st.below_bound and loss > self.bound:
                st.spike_step, st.spike_peak, st.bound_spike = step, loss, True
                return [{**self._event("spike", step, loss, score), "bound": self.bound}]
            st.below_bound = st.below_bound or loss <= self.bound
            if not warm and st.seen >= MIN_SEEN and score > cfg.threshold:
                st.spike_step, st.spike_peak = step, loss
                return [self._event("spike", step, loss, score)]
            if not warm:
                self._fold(loss)
            return []
        st.spike_peak = max(st.spike_peak, loss)
        if loss <= self.bound if st.bound_spike else score < cfg.threshold / 2:
            start, st.spike_step, st.bound_spike = st.spike_step, None, False
            if not warm:
                self._fold(loss)
            ev = self._event("spike_end", step, loss, score)
            return [{**ev, "spike_step": start, "duration": step - start, "peak": st.spike_peak}]
        if st.diverged_at is None and step - st.spike_step >= cfg.divergence:
            st.diverged_at = step
            ev = self._event("divergence", step, loss, score)
            return [{**ev, "spike_step": st.spike_step}]
        return []

    def _event(self, kind: str, step: int, loss: float, score: float) -> dict:
        return {"kind": kind, "step": step, "loss": loss, "score": score, "mean": self.state.mean}

    def metrics(self) -> dict[str, float]:
        return {
            "stability/spike_score": self.score,
            "stability/loss_ema": self.state.mean if self.state.seen else float("nan"),
            "stability/diverged": float(self.diverged),
        }

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = SpikeState(**d)
