"""Device code: Triton (kernels/triton) and CUDA C for CuPy (kernels/cuda). Installed as gpuloss.kernels."""
