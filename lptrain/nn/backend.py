"""Backend selection, resolved once when a layer is built (style principle 2)."""

from __future__ import annotations

BACKENDS = ("auto", "emulated", "triton", "te")


def resolve_backend(name: str) -> tuple[str, str]:
    """(backend, reason). Only the emulated backend ships in this release.

    `auto` resolves to `emulated` on every device: the fake-quantized FP32 reference that the
    planned Triton and TransformerEngine backends must match bit for bit.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name in ("triton", "te"):
        raise ValueError(
            f"backend {name!r} is not available in lptrain 0.1: only the emulated backend ships "
            f"(use backend 'auto' or 'emulated'; GPU kernels are planned behind the same recipes)"
        )
    reason = (
        "auto: emulated (the reference backend; no GPU kernels in this release)"
        if name == "auto"
        else "emulated (requested)"
    )
    return "emulated", reason
