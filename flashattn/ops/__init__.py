"""Below the public functions: the backend choice and launch boundary (dispatch.py), autograd and the
custom operators (custom_ops.py), what each backend supports (capabilities.py), the options and
their exact semantics (variant.py; philox.py for dropout's random numbers), the algorithm in PyTorch
(reference.py) and the Triton kernels (triton/)."""
