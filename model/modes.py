"""``with eval_mode(model):`` evaluation mode for a block, the caller's mode back on every way out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; afterwards (an exception or an interrupt included)
    ``module.train(flag)`` with the flag it had before, as evaluation during training needs."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
