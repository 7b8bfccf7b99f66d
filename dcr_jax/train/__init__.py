"""Training: losses, train state, step builders and the loop."""
