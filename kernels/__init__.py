"""Hand-written Triton kernels (shipped as `lipapers.kernels`)."""
