"""Triton kernels, one file per kernel family: forward.py, backward.py; common.py holds shared helpers."""
