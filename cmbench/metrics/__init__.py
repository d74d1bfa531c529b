"""Sample-quality metrics for the toy and image benchmarks."""
