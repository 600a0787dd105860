"""Feature extraction and classifier training under a launcher's data parallelism (issue 13): the shard /
gather / batch helpers in one process, and a CPU rehearsal of a multi-GPU run (two processes under
`accelerate launch`, torchrun's launcher, gloo on CPU) against one plain process on tiny data
(tests/data_parallel_worker.py): features, a trained few-shot backbone and a trained long-tail classifier."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import distributed
from test_worksharing import ACCELERATE

REPO = Path(__file__).resolve().parents[1]


def test_shards_are_contiguous_and_cover_every_row_once():
    for count in (0, 1, 5, 41):
        for world in (1, 2, 3):
            parts = [distributed.shard(count, world, r) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.shard(7) == range(7)                   # a plain process holds every row
    t = torch.arange(6.0).view(3, 2)
    assert distributed.gather_rows(t) is t and not torch.distributed.is_initialized()


def test_global_batches_are_the_one_process_batches_split_by_rank(monkeypatch):
    one = distributed.GlobalBatches(41, 11, seed=3)
    one.set_epoch(1)
    batches = list(one)
    assert [len(b) for b in batches] == [11, 11, 11, 8] and len(one) == 4 and one.global_size(3) == 8
    assert sorted(r for b in batches for _, r in b) == list(range(41)) and {e for b in batches for e, _ in b} == {1}
    one.set_epoch(2)
    assert list(one) != batches                                # each epoch its own order
    for world in (2, 3):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        slices = []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            s = distributed.GlobalBatches(41, 11, seed=3)
            s.set_epoch(1)
            slices.append(list(s))
        assert [sum((sl[b] for sl in slices), []) for b in range(4)] == batches
    dropped = distributed.GlobalBatches(41, 11, seed=3, drop_last=True)
    assert len(dropped) == 3 and len(list(dropped)) == 3


def test_keyed_augmentation_does_not_depend_on_who_draws():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3)

    rows = distributed.KeyedRows(Noise(), seed=0)
    torch.manual_seed(123)
    a = rows[(0, 2)]
    torch.rand(10)                                             # the process's own RNG has moved on
    assert torch.equal(rows[(0, 2)], a) and not torch.equal(rows[(1, 2)], a) and not torch.equal(rows[(0, 3)], a)
    state = torch.get_rng_state()
    rows[(0, 4)]
    assert torch.equal(torch.get_rng_state(), state)           # and is left as it was


def _run(out: Path, launcher=(), num_workers: int = 0, backbone_epochs: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*launcher, sys.executable, str(REPO / "tests" / "data_parallel_worker.py"), str(out), str(num_workers),
           str(backbone_epochs)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return torch.load(out)


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max(_max_diff(a[k].float(), b[k].float()) for k in a if a[k].is_floating_point())
    return (a.float() - b.float()).abs().max().item()


def test_two_processes_extract_and_train_what_one_process_does(tmp_path):
    """One process (no DataLoader workers) against two processes (one worker each). Tolerances are about 20x
    the differences measured (printed with -s): features 0 (each row is computed alone either way);
    after one epoch of backbone training (41 images in batches of 11: slices of 6/5 and 4/4) 4e-5 in the
    weights; after two epochs of the long-tail classifier 6e-6 in the weights, 8e-7 in the logits."""
    one = _run(tmp_path / "one.pt")
    two = _run(tmp_path / "two.pt", ACCELERATE, num_workers=1)
    assert one["world_size"] == 1 and two["world_size"] == 2
    diffs = {k: _max_diff(one[k], two[k]) for k in ("features", "backbone", "trained_features", "classifier", "logits")}
    print("max |one process - two processes|:", diffs)
    assert diffs["features"] <= 1e-6
    assert diffs["backbone"] <= 1e-3 and diffs["trained_features"] <= 1e-3
    assert diffs["classifier"] <= 1e-4 and diffs["logits"] <= 1e-5
    assert torch.equal(one["predictions"], two["predictions"])
    assert _max_diff(one["initial_backbone"], one["backbone"]) > 0.1   # training moved the weights far beyond it
