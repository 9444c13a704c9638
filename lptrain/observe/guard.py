"""The precision guard: layers whose numerics stay bad fall back to higher precision.

At every check (each `interval` steps) a layer is bad when any of its watched operands has an
SQNR below `min_sqnr_db` or a saturated fraction above `max_saturated` (the step's statistics,
merged over micro-batches and reduced over ranks, so every rank decides the same). After
`patience` bad checks in a row the layer moves one recipe down the `fallback` chain (e.g.
nvfp4 -> fp8-current -> bf16) from the next step on: `Linear.set_recipe`, in place, with fresh
quantizer state for the new recipe. A layer at a recipe that quantizes nothing has no
statistics and stays there.

The guard's state (each layer's position in the chain, the bad-check streaks, the events) is
saved in checkpoints. A resumed model must get its fallbacks *before* the checkpoint's module
state is loaded, since a layer's state keys depend on its recipe (`apply`). The fallbacks are
the run's state, not a setting: they are kept across a resume whatever `enabled` says (off: no
new fallbacks, the old ones stay) and saved again, until `reset` puts every layer back on the
run's recipe.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lptrain.config.precision import resolve_recipe
from lptrain.config.schema import GuardConfig, PrecisionConfig, TrainConfig
from lptrain.errors import ConfigError
from lptrain.nn import Linear
from lptrain.nn.select import matches
from lptrain.observe.layers import Stats
from lptrain.recipes import Recipe, from_dict


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


@dataclasses.dataclass
class GuardState:
    level: dict[str, int] = dataclasses.field(default_factory=dict)  # layer -> chain index
    # layer -> the recipe it runs (Recipe.to_dict): a resume restores exactly these even if
    # `fallback` was edited in between (the chain then only steers later fallbacks).
    recipe: dict[str, dict] = dataclasses.field(default_factory=dict)
    streak: dict[str, int] = dataclasses.field(default_factory=dict)  # consecutive bad checks
    events: list[dict] = dataclasses.field(default_factory=list)


class PrecisionGuard:
    def __init__(self, cfg: GuardConfig, base: Recipe):
        self.cfg = cfg
        self.base = base  # the run's recipe, which every converted layer starts from
        # A disabled guard makes no fallbacks (no chain) but still carries the earlier ones.
        self.chain = _resolve_chain(cfg) if cfg.enabled else []
        self.state = GuardState()

    def watches(self, name: str) -> bool:
        return matches(name, self.cfg.layers) is not None

    def due(self, step: int) -> bool:
        return self.cfg.enabled and step % self.cfg.interval == 0

    def _problem(self, entries: dict[str, dict]) -> str | None:
        """The first watched operand out of bounds, described; None when all are fine."""
        c = self.cfg
        for key, d in sorted(entries.items()):
            if key.endswith(".accumulator") or matches(key, c.operands) is None:
                continue
            if c.min_sqnr_db is not None and d["sqnr_db"] < c.min_sqnr_db:
                return f"{key} sqnr_db {d['sqnr_db']:.2f} < {c.min_sqnr_db:g}"
            if c.max_saturated is not None and d["saturated"] > c.max_saturated:
                return f"{key} saturated {d['saturated']:.4f} > {c.max_saturated:g}"
        return None

    def check(self, step: int, stats: Stats, layers: dict[str, Linear]) -> list[dict]:
        """One check on this step's statistics; switches recipes and returns the events."""
        st, events = self.state, []
        for name, entries in stats.items():
            if name not in layers or not self.watches(name):
                continue
            problem = self._problem(entries)
            st.streak[name] = st.streak.get(name, 0) + 1 if problem else 0
            level = st.level.get(name, -1)
            if st.streak[name] < self.cfg.patience or level + 1 >= len(self.chain):
                continue
            layer = layers[name]
            event = {
                "kind": "guard",
                "step": step,
                "layer": name,
                "from": layer.recipe.name,
                "to": self.chain[level + 1].name,
                "reason": f"{problem} for {st.streak[name]} checks",
            }
            st.level[name], st.streak[name] = level + 1, 0
            st.recipe[name] = self.chain[level + 1].to_dict()
            layer.set_recipe(self.chain[level + 1])
            st.events.append(event)
            events.append(event)
        return events

    def apply(self, model: nn.Module, recipes: dict[str, dict], moved=()) -> None:
        """Put each layer named in `recipes` ({layer: Recipe.to_dict()}, a state's `recipe`) at
        its recipe, and each layer in `moved` (fallbacks in place now) that is not in it back at
        the run's recipe; layers already there keep their state. Other layers are left as they
        were built: only the guard's own decisions are undone."""
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
        unknown = sorted(set(recipes) - set(layers))
        if unknown:
            raise ValueError(f"precision guard: no lptrain layer named {unknown[0]} in the model")
        for name in sorted(set(recipes) | set(moved)):
            want = from_dict(recipes[name]) if name in recipes else self.base
            if layers[name].recipe != want:
                layers[name].set_recipe(want)

    def reset(self, model: nn.Module) -> None:
        """Forget every fallback: those layers back on the run's recipe, with fresh quantizer
        state (call after the checkpoint's module state is loaded)."""
        moved, self.state = self.state.recipe, GuardState()
        self.apply(model, {}, moved)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = GuardState(**d)
