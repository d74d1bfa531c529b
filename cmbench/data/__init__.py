"""Toy data distributions with exact (closed-form or high-accuracy ODE) ground truth."""
