"""cbq_ptq: the CBQ post-training quantization driver (built on cbq_kernels; not yet
implemented)."""
