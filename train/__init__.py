"""Model assembly (CLIP encoder + matcher), config, loss and, later, the DeepSpeed training loop."""
