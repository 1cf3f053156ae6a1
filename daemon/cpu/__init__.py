"""Speed work for MLX's CPU backend: the BLAS it links, weight layouts, fused blocks, worker processes."""
