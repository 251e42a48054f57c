"""Fine-tuning: the settings, the loop, checkpoints, optimizers, trackers and the held-out set."""
