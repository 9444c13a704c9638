"""Which layers a conversion touches: one signature for `lptrain.convert`, `qat.prepare`,
`qat.bitswitch.prepare` and `lora.apply` (torchao's vocabulary).

    targets            module-name globs to convert (default: every eligible layer)
    skip               module-name globs left alone (default: DEFAULT_SKIP, the output head)
    module_filter_fn   (module, fully qualified name) -> bool, applied after the globs

A glob matches the full dotted name or its last part (`lm_head`, `layers.0.attn.wq`, `wq`).
The output head stays in high precision by default everywhere: its logits feed the softmax
of every token, and every low-precision recipe we measured lost more there than it gained.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterable

from torch import nn

from lptrain.errors import ConfigError

DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)
ModuleFilter = Callable[[nn.Module, str], bool]


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob matching the full dotted name or its last part, else None."""
    leaf = name.rsplit(".", 1)[-1]
    for p in patterns:
        if fnmatch.fnmatch(name, p) or fnmatch.fnmatch(leaf, p):
            return p
    return None


def globs(patterns: str | Iterable[str]) -> tuple[str, ...]:
    """A pattern list; one string is one pattern (not its characters)."""
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def require_match(key: str, globs: list[str], names: list[str], what: str) -> None:
    """ConfigError(key) when no name matches any of `globs`: the setting would act on nothing
    (rows with only a step, a guard that never acts, an override that changes no layer),
    silently. A list of which only some globs match is warned about."""
    if any(matches(n, globs) for n in names):
        idle = [g for g in globs if not any(matches(n, (g,)) for n in names)]
        if idle:  # the others match: a typo in one entry still deserves a word
            warnings.warn(f"{key}: {idle} match no {what} (the rest of the list does)",
                          stacklevel=2)  # fmt: skip
        return
    few = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    raise ConfigError(key, f"{list(globs)} match no {what}; the model has {few or 'none'}")


def excluded(
    name: str,
    module: nn.Module,
    targets: Iterable[str],
    skip: Iterable[str],
    module_filter_fn: ModuleFilter | None,
) -> str | None:
    """Why `name` is left alone (a sentence), or None when it is selected."""
    if not matches(name, targets):
        return "not a target"
    hit = matches(name, skip)
    if hit:
        return f"skip {hit!r}"
    if module_filter_fn is not None and not module_filter_fn(module, name):
        return "module_filter_fn"
    return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model` (what every convert does to a layer)."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)
