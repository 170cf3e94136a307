"""inferline: a deadline-aware serving runtime in front of NVIDIA Triton."""

__version__ = "0.1.0"
