"""Triton kernels. Nothing here is imported by ``import quantsink``; each kernel module
imports triton itself, lazily, when a launcher first runs."""
