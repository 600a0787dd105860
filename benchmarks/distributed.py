"""Data parallelism for feature extraction and classifier training under a launcher that starts one
process per device and sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (``accelerate launch
--multi_gpu``, torchrun) or Slurm's ``SLURM_PROCID`` etc. (``srun``). In a plain ``python`` process every helper is a no-op
and torch.distributed is never initialised.

Accelerate itself is not used here: under torchrun on a CPU-only machine its ``PartialState`` reports
no distributed run, and what is needed (one process group, all-gather, all-reduce) is torch's own.
The process group is initialised once, on first use: gloo on CPU, nccl on CUDA.

Training is exact data parallelism of the one-process run: every rank draws the same shuffled order
(keyed by seed and epoch), takes its contiguous slice of each global batch, weights its loss by its
slice's share of the global batch and sums gradients, so each step applies the gradient of the global
batch's mean loss, also for a last batch that does not divide by the world size. Augmentation is keyed
by (seed, epoch, sample), so no draw depends on which process or DataLoader worker makes it; batch
norm computes its statistics over the global batch (:func:`global_batch_norm`)."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def _env(torch_name: str, slurm_name: str, default: str) -> int:
    """A launcher variable: torchrun's (accelerate launch, torchrun) or, in the tasks of an ``srun`` step
    (SLURM_STEP_NUM_TASKS is set only there, not in the batch script), Slurm's."""
    if torch_name in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return int(os.environ.get(torch_name, default))
    return int(os.environ.get(slurm_name, default))


def world_size() -> int:
    return _env("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "1")


def rank() -> int:
    return _env("RANK", "SLURM_PROCID", "0")


def _rendezvous() -> None:
    """torch's env:// rendezvous for srun tasks: the first node of the step, a port from the job and step ids."""
    if "MASTER_ADDR" not in os.environ:
        import subprocess

        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + (int(os.environ.get("SLURM_JOB_ID", "0")) * 7
                                                      + int(os.environ.get("SLURM_STEP_ID", "0"))) % 20000))
    os.environ.setdefault("WORLD_SIZE", str(world_size()))
    os.environ.setdefault("RANK", str(rank()))


def is_main() -> bool:
    """The process that writes results and records (rank 0; the only process of a plain run)."""
    return rank() == 0


def init() -> bool:
    """Join the launcher's process group (once); False in a one-process run."""
    if world_size() == 1:
        return False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            _rendezvous()
        cuda = torch.cuda.is_available()
        if cuda:   # srun --gpus-per-task shows each task one GPU (index 0)
            torch.cuda.set_device(_env("LOCAL_RANK", "SLURM_LOCALID", "0") % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def barrier() -> None:
    if init():
        dist.barrier()


def shard(count: int, world: int | None = None, r: int | None = None) -> range:
    """This rank's contiguous part of ``range(count)``: sizes differ by at most one, earlier ranks larger,
    so concatenating the ranks' parts in rank order gives back ``range(count)``."""
    world, r = world_size() if world is None else world, rank() if r is None else r
    base, extra = divmod(count, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's ``t`` (rows may differ in number), on every rank."""
    if not init():
        return t
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    local = t.to(device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    most = max(int(s) for s in sizes)
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)]).to(t.device)


def sum_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``params`` and ``loss`` over ranks (one all-reduce); returns the summed loss.
    Each rank's loss is its slice's share of the global batch mean, so the sums are the global batch's."""
    if not init():
        return loss.detach()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().float().reshape(1)])
    dist.all_reduce(flat)
    start = 0
    for p, g in zip(params, grads):
        p.grad = flat[start:start + g.numel()].view_as(g).to(g.dtype)
        start += g.numel()
    return flat[-1]


class GlobalBatches(torch.utils.data.Sampler):
    """Batch sampler: this rank's contiguous slice of every global batch of ``batch_size`` rows, as
    ``(epoch, row)`` pairs (the dataset keys augmentation by them, see :class:`KeyedRows`). The order
    is a permutation drawn from ``(seed, epoch)``, the same on every rank; ``set_epoch`` before each epoch."""

    def __init__(self, count: int, batch_size: int, seed: int, drop_last: bool = False):
        self.count, self.batch_size, self.seed, self.drop_last, self.epoch = count, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        from benchmarks.fewshot.sampling import key_seed

        gen = torch.Generator().manual_seed(key_seed(self.seed, "order", self.epoch))
        batches = list(torch.randperm(self.count, generator=gen).split(self.batch_size))
        return batches[:-1] if self.drop_last and batches and len(batches[-1]) < self.batch_size else batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            yield [(self.epoch, int(batch[i])) for i in shard(len(batch))]

    def __len__(self) -> int:
        full, rest = divmod(self.count, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def global_size(self, b: int) -> int:
        """Rows in global batch ``b`` (all ranks' slices together)."""
        return min(self.batch_size, self.count - b * self.batch_size)


def collate(samples: list):
    """DataLoader collate that lets a rank's slice of a last, small global batch be empty (None)."""
    return torch.utils.data.default_collate(samples) if samples else None


class KeyedRows(torch.utils.data.Dataset):
    """``dataset[row]`` with the torch RNG seeded by (seed, epoch, row) while it is made, so a sample's
    augmentation is the same whichever process or worker draws it (keys come from :class:`GlobalBatches`)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        from benchmarks.fewshot.sampling import key_seed

        epoch, row = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (augmentation runs on the CPU): torch.manual_seed also seeds every
            # accelerator's and costs ~90 us, as much as decoding a small image
            torch.default_generator.manual_seed(key_seed(self.seed, "augment", epoch, row))
            return self.dataset[row]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients too: every rank's input feeds every rank's output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch on any backend (torch's SyncBatchNorm runs on GPUs only): sums
    and squared deviations all-reduced with autograd, so forward and backward equal one process's."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"batch norm expects (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        # two passes (mean, then squared deviations): E[x^2] - E[x]^2 loses the variance of
        # activations whose mean is large against their spread (e.g. images mostly background)
        dims, c = [0] + list(range(2, x.dim())), x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        n = torch.tensor([x.numel() / max(c, 1)], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(dims), n]))
        total = stats[-1]
        centred = x - (stats[:c] / total).view(shape)
        mean, var = stats[:c] / total, all_reduce((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1).clamp(min=1))
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its batch norms computing statistics over the global batch when several processes
    train it (SyncBatchNorm on CUDA, :class:`_GlobalBatchNorm` elsewhere); unchanged in one process."""
    if not init():
        return model
    if dist.get_backend() == "nccl":
        from timm.layers import convert_sync_batchnorm   # torch's would drop the activation of timm's BatchNormAct2d

        return convert_sync_batchnorm(model)
    for name, child in model.named_children():
        # exact types only: subclasses (e.g. timm's BatchNormAct2d) do more than normalise
        if type(child) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
            bn = _GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(bn, key, value)   # the same tensors: an optimiser made before still holds them
            setattr(model, name, bn.train(child.training))
        else:
            global_batch_norm(child)
    return model

