"""The Triton kernels, one file per kernel family and architecture: forward.py and backward.py (every
option, any GPU), forward_sm90.py and backward_sm90.py (plain attention on Hopper, in Gluon); choice.py
decides which one runs a call, configs.py holds the tile tables, common.py the shared jit helpers,
launch.py the low-host-cost launcher."""
