"""Running: typed settings, data, the training loop, checkpoints and saved weights, the suite runner."""
