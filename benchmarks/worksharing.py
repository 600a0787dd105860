"""Work shared by any number of processes through claim files on the (shared) output folder, so that a
manifest runs under ``accelerate launch`` (or torchrun, Slurm, several shells) with no coordinator.

A process that wants a unit of work creates ``<board>/<key>.claim`` with ``O_CREAT | O_EXCL`` (atomic
on local and NFS v3+ file systems), holding its host, pid and start time. While it works, a heartbeat
thread refreshes the claim's mtime every ``heartbeat_s``; a claim whose mtime is older than
``stale_after_s`` belongs to a process that died (killed, out of memory, node lost) and is taken over:
it is renamed away (only one taker's rename succeeds) and claimed afresh. On the owner's own host a
claim is stale at once when its pid no longer runs, so a rerun after a kill does not wait. Units are claimed as
processes become free, so no process idles while unclaimed work remains.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClaimBoard:
    def __init__(self, folder: str | os.PathLike, stale_after_s: float = 120.0, heartbeat_s: float = 10.0):
        if heartbeat_s * 3 > stale_after_s:
            raise ValueError("stale_after_s must exceed three heartbeats, or a slow owner loses its claim")
        self.folder = Path(folder)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.claim"

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": self.owner, "since": time.time()}, f)
        return True

    def stale(self, key: str) -> bool:
        """The owner died: its process is gone from this host, or its heartbeat stopped."""
        path = self.path(key)
        try:
            age = time.time() - path.stat().st_mtime
            owner = json.loads(path.read_text() or "{}").get("owner", "")
        except FileNotFoundError:
            return False
        except (OSError, ValueError):  # a claim file cut short by a kill: judged by its age alone
            owner = ""
        host, _, rest = owner.partition(":")
        pid = rest.split(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return True
        return age > self.stale_after_s

    def try_claim(self, key: str) -> bool:
        """Claim ``key``: True if this process now holds it (fresh, or taken over from a dead owner)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        if self._create(path):
            return True
        if not self.stale(key):
            return False
        try:  # take over: only one of several takers renames the stale claim away
            os.rename(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}"))
        except FileNotFoundError:
            return False
        for old in path.parent.glob(f"{path.name}.stale-*"):
            old.unlink(missing_ok=True)
        return self._create(path)

    def release(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextmanager
    def holding(self, key: str) -> Iterator[None]:
        """Keep the claim alive while the body runs, then release it (also when the body fails)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    os.utime(self.path(key))
                except FileNotFoundError:
                    return

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.release(key)
