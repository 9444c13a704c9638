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
from typing import Callable, Iterable

from torch import nn

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
