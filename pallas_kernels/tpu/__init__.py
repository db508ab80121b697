"""Pallas kernels lowered through Mosaic for TPUs (run on the CPU with TPU interpret mode)."""
