"""Custom compute kernels, each with a torch reference and a CPU fallback."""
