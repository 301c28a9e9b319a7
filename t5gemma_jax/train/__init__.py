"""Training: losses, optimizers and schedules, FLOPs, the jitted step and the loop."""
