"""Training: one loop for every variant (loop), and its ranks (distributed)."""
