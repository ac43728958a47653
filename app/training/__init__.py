"""Plain PyTorch, no Flower: the training steps, lambda read once into a plan, the model registry, the accelerator."""
