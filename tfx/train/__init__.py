"""Training: the one loop for every family, optimizers and schedules, checkpoints."""
