"""Optional GPU kernels that speed up MLX layers on backends where the stock ops fall short."""
