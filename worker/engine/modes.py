"""Training modes, saved and restored: the engine runs forward passes in eval mode and hands the
model back with every module's own mode."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` for the block; each module's `training` flag as it was afterwards.

    Only what differs is set (in the pre-order of `modules()`, a parent before its children):
    a job counts MACs after every removal round, inside a block already in eval mode, and
    setting every flag of a transformer twice per count took longer than the count's forward.
    """
    modes = {module: module.training for module in model.modules()}
    if any(modes.values()):
        model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            if module.training != training:
                module.train(training)
