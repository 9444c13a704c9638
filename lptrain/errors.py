"""The one error base of every configuration problem: `ConfigError(path, problem)`.

A recipe key (`optim.lr`), a library field (`weight_bits`) or a recipe field (`forward.input`):
`path` names where the problem is, `problem` says what it is. The CLI prints `error: <path>:
<problem>` and exits 2. Library errors (`lptrain.qat.QATConfigError`, `lptrain.lora.
AdapterConfigError`, `lptrain.nn.RecipeError`, `lptrain.numerics.SpecError`) subclass it, so a
caller catches one class and the trainer re-roots the path under its YAML section.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe problem, reported as `<key path>: <problem>`."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    @property
    def field(self) -> str:
        """The path, by the name library callers know it (a dataclass field)."""
        return self.path


def first_line(exc: BaseException) -> str:
    """A library exception's first line, for a one-line ConfigError that names its cause."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
