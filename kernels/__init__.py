"""GPU kernels (Triton), installed as `lptrain.kernels`; see kernels/README.md.

Importing lptrain never imports Triton: each kernel module imports it itself, and the
backends load a kernel module only when a GPU backend is chosen.
"""
