"""Small helpers shared by the mini-world trainers."""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch
from tqdm import tqdm


def set_threads(n: int) -> None:
    """Fix torch's CPU thread count and ask for deterministic algorithms, for stages that reproduce.

    CPU results depend on the number of threads (it partitions the reductions), not on the number of
    cores: a fixed ``n`` gives the same bits on any machine with the same instruction set, while
    ``0`` (torch's default, one thread per core) makes them depend on the machine."""
    if n > 0:
        torch.set_num_threads(n)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(True, warn_only=True)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(what: str, param_groups, *, steps: int, lr: float, weight_decay: float, warmup: int,
               step_fn: Callable[[int], dict], clip_grad: float | None = None,
               after_step: Callable[[], None] | None = None, log_every: int = 50) -> list[dict]:
    """The one training loop of the mini-world models: AdamW with warm-up + cosine decay.

    ``step_fn(step)`` returns the step's tensors, ``"loss"`` first (back-propagated) and anything
    else to log; a non-finite loss stops training with an error naming the model and step."""
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    log = []
    for step in (bar := tqdm(range(steps), desc=what, mininterval=5)):
        out = step_fn(step)
        loss = out["loss"]
        check_finite(loss, what, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        if step % log_every == 0 or step == steps - 1:
            values = {k: float(v.detach()) for k, v in out.items()}
            log.append({"step": step, **values})
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
    return log


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss is {loss.item()} at step {step}; lower the learning rate")


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
