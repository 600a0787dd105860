"""Seeded support sets and N-way K-shot episodes.

Every draw comes from its own ``numpy.random.Generator`` seeded by the full key of what is drawn
(base seed, benchmark, class, shot, trial / episode), so a support set or episode does not change
when other classes, shots or episode counts are added, and the order of computation never matters.

A support set is drawn per (benchmark, class, shot, trial); an episode picks N classes and one
trial, takes each class's support set of that trial (the images a generator was given as
references) plus Q queries drawn from the class's *other* images, so a query is never in its own
support. One trial for all classes of an episode nests episodes in trials: the T trials are the
independent units the interval resamples (:mod:`.stats`), with no episode straddling two of them."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.fewshot.registry import BenchmarkSpec
from pipelines.io import write_text


def write_text_if_changed(path: str | Path, text: str) -> Path:
    """Atomic write that leaves an identical existing file untouched (a rerun keeps its timestamp)."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return path
    return write_text(path, text)


def key_rng(*key) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (strings enter through CRC32)."""
    entropy = [k if isinstance(k, (int, np.integer)) else zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def key_seed(*key) -> int:
    """A 31-bit integer seed derived from a key (for generators that take one int)."""
    return int(key_rng(*key).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class SupportSet:
    benchmark: str
    split: str
    class_name: str
    shot: int
    trial: int
    rows: tuple[int, ...]  # dataset rows of the support images

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.class_name, self.shot, self.trial)


def draw_supports(spec: BenchmarkSpec, index: dict[str, np.ndarray], split: str, shots, trials: int,
                  seed: int) -> list[SupportSet]:
    """Support sets for every class of ``split`` x shot x trial, each from its own keyed generator."""
    out = []
    for c in spec.classes[split]:
        pool = index.get(c)
        if pool is None or len(pool) == 0:
            raise ValueError(f"class {c!r} ({split}) has no images in the prepared dataset")
        for shot in shots:
            if shot > len(pool):
                raise ValueError(f"class {c!r} ({split}) has {len(pool)} images, fewer than {shot} shots")
            for t in range(trials):
                rows = key_rng(seed, "support", spec.name, c, shot, t).choice(pool, size=shot, replace=False)
                out.append(SupportSet(spec.name, split, c, int(shot), t, tuple(int(r) for r in rows)))
    return out


SUPPORT_FIELDS = ["benchmark", "split", "class_name", "shot", "trial", "rows"]


def write_supports(supports: list[SupportSet], path: str | Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUPPORT_FIELDS)
    for s in supports:
        w.writerow([s.benchmark, s.split, s.class_name, s.shot, s.trial, " ".join(map(str, s.rows))])
    return write_text_if_changed(path, buf.getvalue())


def read_supports(path: str | Path) -> list[SupportSet]:
    with open(path, newline="") as f:
        return [SupportSet(r["benchmark"], r["split"], r["class_name"], int(r["shot"]), int(r["trial"]),
                           tuple(int(x) for x in r["rows"].split()))
                for r in csv.DictReader(f)]


@dataclass
class Episodes:
    """``E`` episodes of one split: arrays of dataset rows, class ``i`` of an episode has label ``i``."""

    benchmark: str
    split: str
    ways: int
    shot: int
    queries: int
    seed: int
    classes: list[list[str]]   # (E, N)
    trials: np.ndarray         # (E, N) which support trial each class uses (sample_episodes: one per episode)
    support: np.ndarray        # (E, N, K) dataset rows
    query: np.ndarray          # (E, N, Q) dataset rows

    def __len__(self) -> int:
        return len(self.classes)

    def head(self, n: int) -> "Episodes":
        """The first ``n`` episodes."""
        return dataclasses.replace(self, classes=self.classes[:n], trials=self.trials[:n], support=self.support[:n],
                                   query=self.query[:n])

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("trials", "support", "query"):
            d[k] = getattr(self, k).tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Episodes":
        d = dict(d)
        for k in ("trials", "support", "query"):
            d[k] = np.asarray(d[k], dtype=np.int64)
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        return write_text_if_changed(path, json.dumps(self.to_json(), sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Episodes":
        return cls.from_json(json.loads(Path(path).read_text()))


def sample_episodes(spec: BenchmarkSpec, index: dict[str, np.ndarray], supports: list[SupportSet], split: str,
                    ways: int, shot: int, queries: int, n_episodes: int, seed: int) -> Episodes:
    """``n_episodes`` N-way K-shot episodes of ``split``; supports come from the ``supports`` manifest."""
    classes = list(spec.classes[split])
    if ways > len(classes):
        raise ValueError(f"{ways}-way episodes need {ways} classes; split {split!r} of {spec.name!r} has {len(classes)}")
    by_key = {s.key: s for s in supports if s.split == split}
    trials = 1 + max((s.trial for s in by_key.values() if s.shot == shot), default=-1)
    if trials == 0:
        raise ValueError(f"no {shot}-shot support sets for split {split!r} of {spec.name!r}")
    for c in classes:
        if len(index[c]) < shot + queries:
            raise ValueError(f"class {c!r} ({split}) has {len(index[c])} images; a {shot}-shot episode with "
                             f"{queries} queries needs {shot + queries}")
    ep_classes, ep_trials, ep_support, ep_query = [], [], [], []
    for e in range(n_episodes):
        rng = key_rng(seed, "episode", spec.name, split, ways, shot, queries, e)
        chosen = [classes[i] for i in rng.choice(len(classes), size=ways, replace=False)]
        t = int(rng.integers(trials))
        tr, sup, qry = [], [], []
        for c in chosen:
            if (c, shot, t) not in by_key:
                raise KeyError(f"episode {e}: no support set for class {c!r}, {shot}-shot, trial {t}")
            s = np.asarray(by_key[(c, shot, t)].rows)
            pool = np.setdiff1d(index[c], s)
            tr.append(t)
            sup.append(s)
            qry.append(rng.choice(pool, size=queries, replace=False))
        ep_classes.append(chosen)
        ep_trials.append(tr)
        ep_support.append(sup)
        ep_query.append(qry)
    return Episodes(spec.name, split, ways, shot, queries, seed, ep_classes,
                    np.asarray(ep_trials, dtype=np.int64).reshape(n_episodes, ways),
                    np.asarray(ep_support, dtype=np.int64).reshape(n_episodes, ways, shot),
                    np.asarray(ep_query, dtype=np.int64).reshape(n_episodes, ways, queries))
