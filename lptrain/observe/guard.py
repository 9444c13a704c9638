"""The precision guard: layers whose numerics stay bad fall back to higher precision.

At every check (each `interval` steps) a layer is bad when any of its watched operands has an
SQNR below `min_sqnr_db` or a saturated fraction above `max_saturated` (the step's statistics,
merged over micro-batches and reduced over ranks, so every rank decides the same). After
`patience` bad checks in a row the layer moves one recipe down the `fallback` chain (e.g.
nvfp4 -> fp8-current -> bf16) from the next step on: `Linear.set_recipe`, in place, with fresh
quantizer state for the new recipe. A layer at a recipe that quantizes nothing has no
statistics and stays there.

`granularity: gemm` moves one GEMM instead of the layer: each (layer, GEMM) has its own streak
and chain position, and a GEMM with a failing operand takes that GEMM from the next recipe of
the chain (`Recipe.take`); the layer's other GEMMs keep theirs. Either way the layer's
`precision.overrides` are applied on top of the new recipe (`pin`): what a person set stays
set, and a step of the chain that changes nothing under them is passed over.

The guard's state (each layer's position in the chain, the bad-check streaks, the events) is
saved in checkpoints. A resumed model must get its fallbacks *before* the checkpoint's module
state is loaded, since a layer's state keys depend on its recipe (`apply`). The fallbacks are
the run's state, not a setting: they are kept across a resume whatever `enabled` says (off: no
new fallbacks, the old ones stay) and saved again, until `reset` puts every layer back on the
run's recipe (with its overrides).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lptrain.config.precision import Override, pin, resolve_recipe
from lptrain.config.schema import GuardConfig, PrecisionConfig, TrainConfig
from lptrain.errors import ConfigError
from lptrain.nn import Linear
from lptrain.nn.select import matches
from lptrain.observe.layers import Stats
from lptrain.recipes import GEMMS, Recipe, from_dict


def _resolve_chain(g: GuardConfig) -> list[Recipe]:
    chain = []
    for i, entry in enumerate(g.fallback):
        try:
            chain.append(resolve_recipe(PrecisionConfig(recipe=entry)))
        except ConfigError as exc:
            raise ConfigError(f"precision.guard.fallback[{i}]", exc.problem) from None
    return chain


def check(cfg: TrainConfig) -> None:
    """Resolve the fallback chain up front (before any heavy work): a ConfigError names it."""
    if cfg.precision.guard.enabled:
        _resolve_chain(cfg.precision.guard)


def fallbacks(extra: dict | None) -> dict[str, dict]:
    """The guard's recipes ({layer: Recipe.to_dict()}) in a checkpoint's `extra`: what
    `lptrain eval` and `lptrain export` put in place as a resume does ({} when none)."""
    guard = ((extra or {}).get("monitoring") or {}).get("guard") or {}
    return dict(guard.get("recipe", {}))


def put(model: nn.Module, recipes: dict[str, Recipe]) -> None:
    """Put each layer named in `recipes` on its recipe (`Linear.set_recipe`: fresh quantizer
    state); a layer already there is left alone. ValueError for a name with no lptrain layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    unknown = sorted(set(recipes) - set(layers))
    if unknown:
        raise ValueError(f"precision guard: no lptrain layer named {unknown[0]} in the model")
    for name, want in recipes.items():
        if layers[name].recipe != want:
            layers[name].set_recipe(want)


@dataclasses.dataclass
class GuardState:
    # unit -> chain index; a unit is a layer (`granularity: layer`) or `<layer>:<gemm>`
    level: dict[str, int] = dataclasses.field(default_factory=dict)
    # layer -> the recipe it runs (Recipe.to_dict): a resume restores exactly these even if
    # `fallback` was edited in between (the chain then only steers later fallbacks).
    recipe: dict[str, dict] = dataclasses.field(default_factory=dict)
    streak: dict[str, int] = dataclasses.field(default_factory=dict)  # unit -> bad checks in a row
    events: list[dict] = dataclasses.field(default_factory=list)


class PrecisionGuard:
    def __init__(self, cfg: GuardConfig, base: Recipe, overrides: list[Override] = ()):
        self.cfg = cfg
        self.base = base  # the run's recipe, which every converted layer starts from
        self.overrides = list(overrides)  # precision.overrides, kept on top of every fallback
        # A disabled guard makes no fallbacks (no chain) but still carries the earlier ones.
        self.chain = _resolve_chain(cfg) if cfg.enabled else []
        self.state = GuardState()

    def base_of(self, layer: str) -> Recipe:
        """The recipe `layer` was converted to: the run's, with its overrides."""
        return pin(layer, self.base, self.overrides)

    def watches(self, name: str) -> bool:
        return matches(name, self.cfg.layers) is not None

    def due(self, step: int) -> bool:
        return self.cfg.enabled and step % self.cfg.interval == 0

    def _problems(self, entries: dict[str, dict]) -> list[tuple[str, str]]:
        """Every watched operand out of bounds, in key order: ('gemm.operand', described)."""
        c, out = self.cfg, []
        for key, d in sorted(entries.items()):
            if key.endswith(".accumulator") or matches(key, c.operands) is None:
                continue
            if c.min_sqnr_db is not None and d["sqnr_db"] < c.min_sqnr_db:
                out.append((key, f"{key} sqnr_db {d['sqnr_db']:.2f} < {c.min_sqnr_db:g}"))
            elif c.max_saturated is not None and d["saturated"] > c.max_saturated:
                out.append((key, f"{key} saturated {d['saturated']:.4f} > {c.max_saturated:g}"))
        return out

    def _verdicts(self, name: str, entries: dict[str, dict]) -> dict[str, tuple | None]:
        """{unit: its first failing (operand key, description) or None} for one layer."""
        bad = self._problems(entries)
        if self.cfg.granularity == "layer":
            return {name: bad[0] if bad else None}
        first = {}
        for key, text in bad:
            first.setdefault(key.split(".")[0], (key, text))
        return {f"{name}:{g}": first.get(g) for g in GEMMS}

    def check(self, step: int, stats: Stats, layers: dict[str, Linear]) -> list[dict]:
        """One check on this step's statistics; switches recipes and returns the events."""
        st, events = self.state, []
        for name, entries in stats.items():
            if name not in layers or not self.watches(name):
                continue
            for unit, bad in self._verdicts(name, entries).items():
                st.streak[unit] = st.streak.get(unit, 0) + 1 if bad else 0
                if st.streak[unit] >= self.cfg.patience:
                    event = self._fall_back(step, name, layers[name], unit, bad)
                    events += [event] if event else []
        return events

    def _fall_back(self, step: int, name: str, layer: Linear, unit: str, bad) -> dict | None:
        """Move `unit` to the next recipe of the chain that changes the layer (None: none
        does, it stays where it is)."""
        st, (key, problem) = self.state, bad
        gemm, operand = key.split(".") if self.cfg.granularity == "gemm" else (None, None)
        for level in range(st.level.get(unit, -1) + 1, len(self.chain)):
            new = self._next(name, layer.recipe, self.chain[level], gemm)
            if new is not None and not new.runs_like(layer.recipe):
                break
        else:
            return None
        event = {"kind": "guard", "step": step, "layer": name}
        if gemm is not None:
            event.update(gemm=gemm, operand=operand)
        event.update({"from": layer.recipe.name, "to": new.name})
        event["reason"] = f"{problem} for {st.streak[unit]} checks"
        st.level[unit], st.streak[unit] = level, 0
        st.recipe[name] = new.to_dict()
        layer.set_recipe(new)
        st.events.append(event)
        return event

    def _next(self, name: str, current: Recipe, target: Recipe, gemm: str | None):
        """The layer's recipe one step down: `target` (or `current` with `gemm` taken from
        it), the layer's overrides on top; None when they do not compose (a GEMM whose
        operands would rotate differently): that step of the chain is passed over."""
        try:
            return pin(name, target if gemm is None else current.take(target, gemm), self.overrides)
        except ConfigError:  # RecipeError is one
            return None

    def apply(self, model: nn.Module, recipes: dict[str, dict], moved=()) -> None:
        """Put each layer named in `recipes` ({layer: Recipe.to_dict()}, a state's `recipe`) at
        its recipe, and each layer in `moved` (fallbacks in place now) that is not in it back at
        the recipe it was converted to; layers already there keep their state. Other layers are
        left as they were built: only the guard's own decisions are undone."""
        names = sorted(set(recipes) | set(moved))
        put(model, {n: from_dict(recipes[n]) if n in recipes else self.base_of(n) for n in names})

    def reset(self, model: nn.Module) -> None:
        """Forget every fallback: those layers back on the run's recipe (with their overrides),
        with fresh quantizer state (call after the checkpoint's module state is loaded)."""
        moved, self.state = self.state.recipe, GuardState()
        self.apply(model, {}, moved)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = GuardState(**d)
