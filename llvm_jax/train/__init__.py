"""Training: losses, optimiser, checkpoints, metrics and the train loop."""
