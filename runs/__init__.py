"""Base package: models, data, checkpoints, training and results I/O.

`runs` imports none of its siblings (probes, landscape, tickets, figures).
"""

__version__ = "0.1.0"
