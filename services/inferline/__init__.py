"""inferline: a deadline-aware serving runtime in front of NVIDIA Triton."""

from inferline import feast_import

__version__ = "0.1.0"

feast_import.install()  # Feast's typeguard instrumentation costs seconds per process (feast_import)
