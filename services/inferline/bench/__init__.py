"""Load generation and measurement for inferline benchmarks and ``inferline bench``.

``loadgen`` is the open-loop Poisson generator and the rate sweep that finds a target's
knee; ``targets`` builds the callables it drives (Triton directly, any KServe v2 hop in
front of Triton, and the router's ``Predict``). For mixed traffic, ``mix`` draws each
request's traffic class, ``recording`` calls the three kinds of target and records what
answered, ``multiproc`` runs the generator in several processes, ``analysis`` turns their
results into a step summary, ``runner`` runs fixed-rate and sweep modes over several
targets, and ``report`` writes the JSON and the HTML report with plots.
"""
