"""Triton JIT kernels. Importing a module here imports triton."""
