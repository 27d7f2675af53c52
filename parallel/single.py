"""
One device, no communication: the baseline that every other strategy must reproduce exactly.

All of its behaviour is the Strategy base class (parallel/__init__.py): build the GPT on the device, accumulate
gradients over the micro-batches, clip, step. Run it with plain `python train.py` (or torchrun with one process).
"""

from parallel import Strategy, register


@register("single", "pytorch")
class Single(Strategy):
    """The whole model and the whole global batch on one process."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if self.world_size != 1:
            raise ValueError(f"parallel='single' runs on one process, but WORLD_SIZE={self.world_size}; "
                             f"pick a parallel strategy (e.g. --parallel=ddp) or launch one process")
