"""The loss-spike detector (observe/spikes.py) on synthetic loss sequences."""

from __future__ import annotations

import math
import random

import pytest

from lptrain.config.schema import SpikeConfig
from lptrain.observe.spikes import SpikeDetector

CFG = SpikeConfig(ema=0.05, threshold=5.0, warmup=30, divergence=20)


def _noisy(n: int, seed: int = 0, level: float = 2.0, noise: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, noise) for _ in range(n)]


def _run(losses: list[float], cfg: SpikeConfig = CFG):
    det, events = SpikeDetector(cfg), []
    for step, loss in enumerate(losses, start=1):
        events += det.update(step, loss)
    return det, events


def test_noise_alone_raises_nothing():
    det, events = _run(_noisy(400))
    assert events == [] and not det.diverged
    assert abs(det.score) < 5 and det.state.mean == pytest.approx(2.0, abs=0.01)


def test_a_spike_is_flagged_and_its_recovery_timed():
    losses = _noisy(100)
    losses[60:63] = [3.0, 2.6, 2.2]  # up 50 sigma, back down within three steps
    det, events = _run(losses)
    assert [e["kind"] for e in events] == ["spike", "spike_end"]
    spike, end = events
    assert spike["step"] == 61 and spike["score"] > 50 and spike["loss"] == 3.0
    assert end["step"] == 64 and end["duration"] == 3 and end["peak"] == 3.0
    assert not det.diverged


def test_warmup_is_neither_scored_nor_folded():
    losses = [5.0 - i / 10 for i in range(CFG.warmup)] + _noisy(60)  # a fast initial drop
    det, events = _run(losses)
    assert events == [] and det.state.mean == pytest.approx(2.0, abs=0.01)
    assert det.state.var < 0.01**2 * 2  # the drop did not inflate the deviation


def test_an_unrecovered_spike_raises_the_divergence_flag_once():
    losses = _noisy(50) + [4.0] * 40  # a new, much higher plateau
    det, events = _run(losses)
    assert [e["kind"] for e in events] == ["spike", "divergence"]
    assert events[1]["step"] == events[0]["step"] + CFG.divergence == 71
    assert det.diverged and det.metrics()["stability/diverged"] == 1.0
    # The statistics stayed frozen at the pre-spike level: the plateau is not the new normal.
    assert det.state.mean == pytest.approx(2.0, abs=0.01)


def test_non_finite_losses_are_not_scored():
    losses = _noisy(60)
    losses[40] = math.nan
    det, events = _run(losses)
    assert events == [] and det.state.count == 59 and det.state.seen == 59 - CFG.warmup


def test_state_round_trip_continues_identically():
    losses = _noisy(80)
    losses[70] = 3.0
    whole = _run(losses)[1]
    first, _ = _run(losses[:50])
    resumed = SpikeDetector(CFG)
    resumed.load_state_dict(first.state_dict())
    tail = [e for step, x in enumerate(losses[50:], start=51) for e in resumed.update(step, x)]
    assert tail == whole and tail[0]["step"] == 71


def test_the_warmup_flags_a_loss_above_the_uniform_guess():
    # The review's run, in miniature: inside the warmup (30) the loss jumps from 3.35 to 7.78,
    # above ln(257) = 5.55, the loss of a uniform guess; without the bound nothing is flagged.
    losses = [5.6, 4.0, 3.5, *([3.35] * 8), 7.78, 6.0, 3.4, *_noisy(60, level=3.3)]
    assert _run(losses)[1] == []
    det, events = SpikeDetector(CFG, math.log(257)), []
    for step, loss in enumerate(losses, start=1):
        events += det.update(step, loss)
    # Step 1's 5.6 (a fresh model sits near ln V) only arms the check.
    assert [e["kind"] for e in events] == ["spike", "spike_end"]
    spike, end = events
    assert (spike["step"], spike["loss"], spike["bound"]) == (12, 7.78, math.log(257))
    assert (end["step"], end["duration"], end["peak"]) == (14, 2, 7.78)
    assert not det.diverged and det.state.mean == pytest.approx(3.3, abs=0.01)
