"""vramplan: make video diffusion fit the GPU you have."""
