"""CUDA C sources compiled at run time by cupy.RawModule (NVRTC)."""
