"""Training: the DeepSpeed loop, the contrastive loss, hard-negative mining, checkpoints and logging."""
