"""`CompactAdamW`: torch's AdamW with compact moments and, optionally, no FP32 master copy
(algorithms.md §10).

The arithmetic is torch.optim.AdamW's single-tensor path, op for op, in FP32: with
`states="fp32"` and `master="fp32"` it matches torch bit for bit (a test checks). What changes:

* `states`: each moment is decoded to FP32 before the step and encoded after it
  (optim/states.py). The step itself uses the fresh FP32 moments, as bitsandbytes' 8-bit
  Adam does; only what is kept until the next step is quantized.
* `master="bf16-sr"`: the parameters are BF16 and there is no FP32 copy. The new weight is
  computed in FP32 and rounded to BF16 stochastically, so updates smaller than half a BF16
  step still move the weight in expectation (round-to-nearest would drop them all: the
  stagnation that FP32 master weights exist to prevent). The random bits are counter-based:
  seeded by (seed, the parameter's step count, the parameter's index), as the recipes' SR is
  seeded by (layer seed, call index, phase), so a resumed run draws the same bits.

`record_moments`: while set (the monitoring sets it for its steps), each update also records in
`moment_stats[p]` how much storing the moments lost (`states.quantization_sums`): a tensor beside
the state, never in `state_dict`, computed only when asked.

It is DeepSpeed's client optimizer (distributed/engine.py). Under ZeRO 1-2 its parameters
are DeepSpeed's flat FP32 partitions, each a slice of its parameter group's flat buffer, and
`block_starts` (set by the engine) says where: the blocks are the whole buffer's, so the codes
and scales of a partition are those of the same elements on any number of ranks, except a
block cut by a partition boundary (optim/reshard.py carries them to another rank count). Each
param group holds `reshard.LAYOUT` to say so in what is saved; a state saved without it (before
these blocks) is re-encoded once on load where its blocks lie elsewhere (`load_state_dict`).
"""

from __future__ import annotations

import itertools

import torch

from lptrain.nn.call import derive_seed
from lptrain.numerics.rounding import round_to_format
from lptrain.optim import reshard
from lptrain.optim import states as st

MASTERS = ("fp32", "bf16-sr")


class CompactAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        states: str = "fp32",
        master: str = "fp32",
        seed: int = 0,
    ):
        if master not in MASTERS:
            raise ValueError(f"master must be one of {MASTERS}, got {master!r}")
        self.format = st.get_state_format(states)
        self.master = master
        self.seed = int(seed)
        self.record_moments = False
        self.moment_stats: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> (2, 4) float64
        # parameter -> index of its first element in the flat tensor whose blocks it uses
        self.block_starts: dict[torch.Tensor, int] = {}
        # blocks the last load_state_dict re-encoded from an old layout's (None: it kept all)
        self.regrouped: int | None = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        defaults[reshard.LAYOUT] = reshard.GROUP_ALIGNED
        super().__init__(params, defaults)
        for p in self._params():
            want = torch.bfloat16 if master == "bf16-sr" else torch.float32
            if p.dtype != want:
                raise ValueError(f"master={master!r} updates {want} parameters, got {p.dtype}")

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = ((group, p) for group in self.param_groups for p in group["params"])
        for index, (group, p) in enumerate(pairs):  # index: the SR seed's (`_round_bf16`)
            if p.grad is not None:
                self._update(p, group, index)
        return loss

    def _update(self, p: torch.Tensor, group: dict, index: int) -> None:
        state = self.state[p]
        start = self.block_starts.get(p, 0)
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in st.MOMENTS:
                self._store(state, name, torch.zeros(p.numel(), device=p.device), start)
        state["step"] += 1
        t = state["step"].item()
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        grad = p.grad.reshape(-1).float()
        m, v = (self._load(state, name, start) for name in st.MOMENTS)
        # fp32: the update runs in place on the parameter (a view: never a silent copy)
        w = p.view(-1) if self.master == "fp32" else p.view(-1).float()
        # torch/optim/adamw.py `_single_tensor_adam`, op for op (decoupled weight decay first).
        w.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        if self.master == "bf16-sr":
            p.copy_(self._round_bf16(w, t, index).view_as(p))
        self._store(state, "exp_avg", m, start)
        self._store(state, "exp_avg_sq", v, start)
        if self.record_moments:
            # m and v are still the fresh FP32 moments: what the step held before storing
            sums = [
                st.quantization_sums(x, self._load(state, n, start))
                for n, x in zip(st.MOMENTS, (m, v), strict=True)
            ]
            self.moment_stats[p] = torch.stack(sums)

    def _round_bf16(self, w: torch.Tensor, t: float, index: int) -> torch.Tensor:
        g = torch.Generator(device=w.device)
        g.manual_seed(derive_seed(self.seed, int(t), index))
        return round_to_format(w, "e8m7", "stochastic", generator=g).to(torch.bfloat16)

    # ------------------------------------------------------------ the stored moments

    def _load(self, state: dict, name: str, start: int = 0) -> torch.Tensor:
        """The moment as a flat FP32 tensor the step may modify in place."""
        fmt = self.format
        if fmt.dtype is not None:
            return state[name].float() if fmt.dtype != torch.float32 else state[name]
        codec = fmt.codec(name)
        return st.decode(state[f"{name}_codes"], state[f"{name}_scales"], codec, start=start)

    def _store(self, state: dict, name: str, value: torch.Tensor, start: int) -> None:
        fmt = self.format
        if fmt.dtype is not None:
            if fmt.dtype == torch.float32 and name in state:
                return  # updated in place by the step
            state[name] = value.to(fmt.dtype)
            return
        codec = fmt.codec(name)
        state[f"{name}_codes"], state[f"{name}_scales"] = st.encode(value, codec, start)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating-point state tensor to its parameter's dtype: BF16
        parameters would round the FP32 scales. Put back each saved tensor as saved. Then
        bring a state saved before group-aligned blocks to them (`_regroup`).
        `block_starts` must be set first (distributed/engine.py `initialize` does, before any
        checkpoint load)."""
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for saved_id, p in zip(saved_ids, self._params(), strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = value.to(p.device, copy=True)
        self.regrouped = self._regroup()

    def _regroup(self) -> int | None:
        """Re-encode, once, each loaded state whose saved blocks begin elsewhere than
        `block_starts` says (`reshard.saved_start`: a multi-rank ZeRO 1-2 state saved before
        group-aligned blocks, on a slice that does not start at a multiple of BLOCK), and mark
        every group as group-aligned (torch's load put the saved group keys in place). Returns
        how many blocks that changed in value, or None where nothing was re-encoded."""
        changed = None
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p):
                    continue  # no step taken yet: nothing saved
                start = self.block_starts.get(p, 0)
                saved_at = reshard.saved_start(group, start)
                self.state[p], n = reshard.regrouped(self.state[p], self.format, saved_at, start)
                changed = changed if n is None else (changed or 0) + n
            group[reshard.LAYOUT] = reshard.GROUP_ALIGNED
        return changed

    def state_bytes(self) -> int:
        """Bytes of the moments held now (codes, scales), from the tensors."""
        return sum(
            v.numel() * v.element_size()
            for s in self.state.values()
            for k, v in s.items()
            if k != "step" and isinstance(v, torch.Tensor)
        )


def adamw_reference(
    w: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of `CompactAdamW` in FP64 (the specification), from the weights and the
    moments as the last step stored them (decoded): (new weight before any BF16 rounding,
    new m, new v) as flat FP64 tensors. What `CompactAdamW` then stores is
    `states.encode` of these moments (FP64 in, the same FP32 scales and codes)."""
    w, grad, m, v = (x.double().reshape(-1) for x in (w, grad, m, v))
    beta1, beta2 = betas
    w = w * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    w = w - lr / (1 - beta1**t) * m / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps)
    return w, m, v
