"""Hand-written kernels: `triton/` (CUDA/ROCm GPUs, torch) and `pallas/` (TPU and GPU, JAX).

Importing a family's package registers its implementations with `qkernels.dispatch` when its
compiler is installed; the bindings import them.
"""
