"""Kernels and their declarations: the PyTorch reference (reference.py), the Triton kernels (triton/),
the options and their semantics (variant.py, philox.py for dropout), the custom-operator
registration (custom_ops.py) and the backend boundary (dispatch.py)."""
