"""Backends: what runs a Linear's quantizers and GEMMs. Chosen once per model (style principle 2).

A backend does three things: `supports(recipe)` says whether it runs a recipe exactly (None) or
why not (a sentence); `quantize` fake-quantizes one operand; `gemm` runs one of the three GEMMs,
C = A . B^T with both operands quantized along their last axis. The emulated backend
(`emulated.py`, pure PyTorch, any device) is the definition every other backend must match.

`resolve(name, recipe, device)` turns the `backend:` setting into a backend and the reason it
was chosen; `lptrain.convert` calls it once per model and logs the reason. Backends:
`emulated.py` (the reference), `triton.py` (lptrain.kernels + hardware FP8 GEMMs, checked by
`selftest.py` on the device before use), `te.py` (TransformerEngine, recipes mapped as data).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from lptrain.nn.backends.base import Backend, BackendError, GemmResult
from lptrain.nn.backends.emulated import EmulatedBackend
from lptrain.nn.backends.selftest import self_test
from lptrain.nn.backends.te import TEBackend

if TYPE_CHECKING:
    from lptrain.nn.recipe import Recipe

BACKENDS = ("auto", "emulated", "triton", "te")


def resolve(
    name: str,
    recipe: "Recipe",
    device: torch.device | str | None = None,
    *,
    whole_layers: bool = False,
) -> tuple[Backend, str]:
    """(backend, reason) for the `backend:` setting, a recipe and the device the model runs on
    (CUDA whenever present: a model on the CPU is taken to be on its way there; else the CPU);
    BackendError (a ValueError) with the reason if impossible.
    `whole_layers`: the caller can swap whole layers (lptrain.convert), which backend 'te'
    needs: it runs TransformerEngine's Linear instead of lptrain's three GEMMs.

    auto: the Triton backend on a CUDA device when Triton is installed, it implements the recipe
    exactly and passes the capability self-test there; otherwise the emulated backend, with the
    reason. TransformerEngine is never picked automatically: its kernels are its own, not
    checked against lptrain's reference (ask for it with backend 'te').
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "meta" or (device.type == "cpu" and _has_cuda()):
        # Models are built and converted on the CPU, then moved (DeepSpeed places them): with a
        # GPU present that is where they run. A backend whose kernels cannot run where a tensor
        # ends up hands that call to the reference.
        device = torch.device(_default_device())
    if name == "emulated":
        return _checked(EmulatedBackend(), recipe), "emulated (requested)"
    if name == "te":
        if not whole_layers:
            raise BackendError(
                "backend 'te' swaps whole layers for TransformerEngine's Linear: convert the "
                "model with lptrain.convert(model, recipe, backend='te')"
            )

        backend = TEBackend.create(recipe, device)  # raises with the reason
        return backend, f"te (requested; {backend.describe()})"
    if name == "triton":
        why = _triton_unavailable(device)
        if why:
            raise BackendError(f"backend 'triton' is not available: {why}")
        backend, why = _triton(recipe, device)
        if why:
            raise BackendError(f"backend 'triton' cannot run recipe {recipe.name!r}: {why}")
        return backend, f"triton (requested; {_where(device)})"
    # auto
    if not recipe.quantizes:
        return EmulatedBackend(), "auto: emulated (the recipe quantizes nothing)"
    why = _triton_unavailable(device) if device.type == "cuda" else "no CUDA device"
    if not why:
        backend, why = _triton(recipe, device)
        if not why:
            return backend, (
                f"auto: triton ({_where(device)}; the recipe's quantizers and GEMMs reproduced "
                "the reference in the capability self-test)"
            )
    return _checked(EmulatedBackend(), recipe), f"auto: emulated (triton: {why})"


def _checked(backend: Backend, recipe: "Recipe") -> Backend:
    why_not = backend.supports(recipe)
    if why_not:
        raise BackendError(f"backend {backend.name!r} cannot run recipe {recipe.name!r}: {why_not}")
    return backend


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _default_device() -> str:
    return "cuda" if _has_cuda() else "cpu"


def _where(device: torch.device) -> str:
    if device.type != "cuda":
        return "Triton's CPU interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}"


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None. Imports Triton only when it is
    installed and a Triton backend is being considered."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'lptrain[gpu]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        import triton  # optional dependency (the gpu extra): present, checked above

        if triton.knobs.runtime.interpret:
            return None
        return (
            "the kernels run on CUDA devices; on a CPU only under Triton's interpreter "
            "(TRITON_INTERPRET=1, for tests)"
        )
    return f"no Triton kernels for device type {device.type!r}"


def _triton(recipe: "Recipe", device: torch.device) -> tuple[Backend | None, str | None]:
    # optional dependency: the Triton backend imports triton (the gpu extra) at its top
    from lptrain.nn.backends.triton import TritonBackend

    backend = TritonBackend()
    why = backend.supports(recipe) or self_test(backend, recipe, device)
    return (None, why) if why else (backend, None)


__all__ = ["BACKENDS", "Backend", "BackendError", "EmulatedBackend", "GemmResult", "resolve"]
