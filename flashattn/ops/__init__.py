"""Kernels and their declarations: the PyTorch reference (reference.py), the Triton kernels (triton/),
the custom-operator registration (custom_ops.py) and the backend boundary (dispatch.py)."""
