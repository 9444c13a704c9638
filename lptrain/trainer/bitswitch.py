"""The multi-bit-width step function of a bit-switching run (docs/algorithms.md §7.2-7.3).

The model was converted by lptrain/models/bitswitch.py. Step: one training batch runs at every
candidate bit-width, highest first. Pass k
at bit-width b: every layer is set to b (HASB: each layer instead draws its own with
probability σ_t, hasb.py), the quantizer group's lr is the schedule's × α^k (ALRS), and the
wrapped step function runs the batch (its micro-batches, backward, one optimizer update). So a
training step makes len(bits) updates; the lr of each is a pure function of (step, k), and the
layers return to `eval_bits` afterwards (evaluation, checkpoints). With `distill` > 0, passes
below the highest bit-width learn from the highest pass's predictions of the same micro-batch
(PSKD: (1 - α_t)·CE + α_t·CE(p_high, p_b), α_t = distill·(step+1)/steps, §7.2).

`optim.grad_clip` clips each pass's update by that update's whole gradient norm (DeepSpeed),
quantizer steps included: measured against leaving them out (BENCHMARKS.md "Bit switching:
the gradient clip"), no alternative won at every bit-width. The row logs each pass's pre-clip
norm as `grad_norm_b<B>` and the largest as `grad_norm`.

Nothing here keeps state across steps: the draws come from (seed, step, pass), so a resume
from a checkpoint (weights, scales, `active_bits` and `hmt` buffers, optimizer) is exact.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lptrain.distributed import engine as eng
from lptrain.models.bitswitch import BitSwitchConverter
from lptrain.qat import bitswitch as bs
from lptrain.trainer.step import StepResult


class JointStep:
    """The step function of a bit-switching run (module docstring)."""

    def __init__(self, inner, conv: BitSwitchConverter):
        self.inner, self.conv = inner, conv
        sec = conv.section
        self.multipliers = bs.alrs_multipliers(conv.bits, sec.alrs_alpha, sec.alrs_stop_bit)

    def __call__(self, s, p):
        c, sec, e = self.conv, self.conv.section, s.engine
        hmt = {name: float(m.hmt) for name, m in bs.bitswitch_layers(s.model)}
        sigma_t = (
            bs.switch_probability(p.step, s.total_steps, sec.hasb.sigma, sec.hasb.warmup_steps)
            if sec.hasb.enabled
            else 0.0
        )
        alpha_t = sec.distill * (p.step + 1) / max(s.total_steps, 1)
        distiller = Distiller(s.model, alpha_t) if alpha_t > 0 else None
        results, extra = [], {}
        try:
            with eng.lr_probe(e) as seen:
                for k, b in enumerate(c.bits):
                    bits = b
                    if sigma_t > 0:
                        gen = bs.pass_generator(c.seed, p.step, k)
                        bits = bs.sample_bits(hmt, b, c.bits, sigma_t, gen)
                        extra[f"switched_b{b}"] = sum(v != b for v in bits.values())
                    bs.set_bits(s.model, bits)
                    eng.schedule_lrs(e, p.step, {"quantizer": self.multipliers[k]})
                    n_seen = len(seen)
                    with distiller.pass_(teacher=k == 0) if distiller else contextlib.nullcontext():
                        r = self.inner(s, p)
                    results.append(r)
                    extra[f"loss_b{b}"] = r.loss
                    extra[f"grad_norm_b{b}"] = r.grad_norm
                    used = _merged(seen[n_seen:])  # empty: the update was skipped
                    extra[f"lr_b{b}"] = used.get("0", math.nan)
                    extra[f"lr_quantizer_b{b}"] = used.get("quantizer", math.nan)
        finally:
            bs.set_bits(s.model, c.eval_bits)
            eng.schedule_lrs(e, p.step + 1)  # ALRS restored; the plain schedule's next step
        if sigma_t > 0:
            extra["hasb_sigma"] = sigma_t
        loss = sum(r.loss for r in results) / len(results)
        # The row's grad_norm: the largest of the passes' norms (each before its clip, over
        # every trainable parameter, quantizer steps included); grad_norm_b<B> has each.
        norms = [r.grad_norm for r in results]
        norm = next((x for x in norms if not math.isfinite(x)), max(norms))  # non-finite wins
        return StepResult(loss, norm, any(r.skipped for r in results), extra)


def _merged(records: list[dict[str, float]]) -> dict[str, float]:
    """The lrs of one update: ZeRO-1/2 step the torch optimizer once per group with only that
    group in `param_groups` (so an unnamed group shows as "0"), stage 0 once with all: the
    first record of each key is the first group's."""
    out: dict[str, float] = {}
    for rec in records:
        for key, lr in rec.items():
            out.setdefault(key, lr)
    return out


def output_head(model: nn.Module) -> nn.Module:
    """The module whose output is the logits: `lm_head` (lptrain's Decoder) or a Hugging Face
    model's output embeddings."""
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "model"):
        head = model.model.get_output_embeddings()
    if head is None:
        raise ValueError("bitswitch.distill: cannot find the model's output head (lm_head)")
    return head


class Distiller:
    """Self-distillation through forward hooks (the trainer's step runs the model as usual):
    the head's logits are captured; in the teacher pass they are kept per micro-batch
    (detached); in later passes the model's returned loss becomes
    (1 - α)·loss + α·CE(softmax(teacher logits), student logits)."""

    def __init__(self, model: nn.Module, alpha: float):
        self.model, self.head, self.alpha = model, output_head(model), alpha
        self.teacher: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None

    @contextlib.contextmanager
    def pass_(self, teacher: bool):
        index = [0]

        def keep_logits(module, args, output):
            self.logits = output

        def mix_loss(module, args, loss):
            if not module.training or self.logits is None:
                return loss
            logits, self.logits = self.logits, None
            if teacher:
                self.teacher.append(logits.detach().float().softmax(-1))
                return loss
            target = self.teacher[index[0]]
            index[0] += 1
            soft = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(0, 1))
            return (1 - self.alpha) * loss + self.alpha * soft

        hooks = [self.head.register_forward_hook(keep_logits),
                 self.model.register_forward_hook(mix_loss)]  # fmt: skip
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
