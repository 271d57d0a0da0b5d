"""The generation engine: one thread owns MLX and steps a continuous batch of sequences."""
