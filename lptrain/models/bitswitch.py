"""The `bitswitch` converter (docs/algorithms.md §7.2-7.3): before DeepSpeed, with HASB, the
per-layer Hessian traces of the float model (Hutchinson on the first training batch, identical
on every rank) go into each layer's `hmt` buffer; every linear layer becomes a
`BitSwitchLinear`; every bit-width's input steps are calibrated on the same batch; the layers
are left at `eval_bits`. The step that trains them is lptrain/trainer/bitswitch.py.
"""

from __future__ import annotations

from torch import nn

from lptrain.config import finetune
from lptrain.qat import bitswitch as bs
from lptrain.qat.layers import select


class BitSwitchConverter:
    name = "bitswitch"

    def __init__(self, cfg):
        self.section = cfg.bitswitch
        self.qcfg = finetune.bitswitch_config(cfg.bitswitch)
        self.bits = self.qcfg.bits  # highest first
        self.eval_bits = self.section.eval_bits or self.bits[0]
        self.seed = cfg.run.seed

    def convert(self, model: nn.Module, ctx) -> nn.Module:
        s, h = self.section, self.section.hasb
        hmt = self._traces(model, ctx) if h.enabled and ctx.sample is not None else None
        model = bs.prepare(model, self.qcfg, skip=tuple(s.skip), log_fn=ctx.say)
        if hmt is not None:
            for name, m in bs.bitswitch_layers(model):
                m.hmt.fill_(hmt[name])
        if s.act_bits and ctx.sample is not None:
            bs.calibrate(model, ctx.sample())
        bs.set_bits(model, self.eval_bits)
        return model

    def _traces(self, model: nn.Module, ctx) -> dict[str, float]:
        h = self.section.hasb
        layers = select(model, ("*",), self.section.skip)
        weights = {name: layer.weight for name, _, _, layer in layers}  # the Parameters
        batches = list(ctx.sample(h.hessian_batches).chunk(h.hessian_batches))
        hmt, res = bs.layer_traces(
            model, weights, batches, max_iter=h.hessian_iters, tol=h.hessian_tol, seed=self.seed
        )
        mean = sum(hmt.values()) / max(len(hmt), 1)
        ctx.say(
            f"bitswitch: Hessian traces of {len(hmt)} layers in {res.iterations} Hutchinson "
            f"draws; mean trace per weight {mean:.3g}, {sum(v >= mean for v in hmt.values())} "
            "layers sensitive"
        )
        return hmt
