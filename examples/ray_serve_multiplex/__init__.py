"""Several models of different sizes from one Ray Serve deployment, each replica on a budget.

Run it with ``python -m examples.ray_serve_multiplex`` from the repository's root.
"""
