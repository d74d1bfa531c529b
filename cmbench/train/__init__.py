"""Training: one loop for every variant, checkpoint IO."""
