"""Load generation and measurement for inferline benchmarks.

``loadgen`` is the open-loop Poisson generator and the rate sweep that finds a target's
knee; ``targets`` builds the callables it drives (Triton directly, any KServe v2 hop in
front of Triton, and the router's ``Predict``).
"""
