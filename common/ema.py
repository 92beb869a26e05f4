"""Exponential moving average of the trainable weights, with Flow-GRPO's schedule.

decay(n) = min(max_decay, (1 + n) / (10 + n)) at optimizer step n, applied every
`update_every` steps (published: 0.9 and 8). The public code calls it once per micro-batch,
i.e. G times in a row per update (ALGORITHMS.md §8.3 quirk); we call it once per optimizer
step. `swapped()` puts the EMA weights in for evaluation/saving and restores the live ones.
"""

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, parameters, max_decay=0.9, update_every=8):
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone().float() for p in self.parameters]
        self.max_decay, self.update_every = max_decay, update_every

    def decay(self, step):
        return min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, optimizer_step):
        if (optimizer_step + 1) % self.update_every:
            return
        decay = self.decay(optimizer_step)
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.add_((1 - decay) * (param.detach().float() - shadow))

    @contextmanager
    @torch.no_grad()
    def swapped(self):
        live = [p.detach().clone() for p in self.parameters]
        for param, shadow in zip(self.parameters, self.shadow):
            param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            for param, saved in zip(self.parameters, live):
                param.copy_(saved)

    def state_dict(self):
        """Full tensors (gathered from the shards under FSDP: every rank calls it)."""
        from common.distributed import full_tensor

        return {"shadow": [full_tensor(s).to("cpu", copy=True) for s in self.shadow], "max_decay": self.max_decay,
                "update_every": self.update_every}

    @torch.no_grad()
    def load_state_dict(self, state):
        from common.distributed import load_full_state

        load_full_state(dict(enumerate(self.shadow)), dict(enumerate(state["shadow"])))
