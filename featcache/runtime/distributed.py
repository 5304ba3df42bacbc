"""Distributed runs under torchrun: ranks, coordination, and the ``--nproc`` launcher.

Extraction needs only small messages between ranks (a go/no-go decision,
fingerprints, row counts, barriers), so its process group is gloo, also on
GPU nodes; the features never cross it. Fine-tuning all-reduces gradients,
so on GPUs it asks for NCCL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import UserError
from featcache.runtime.device import cpu_cores


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, choose, *, refusal: str | None = None):
        """Rank 0 runs ``choose()`` and every rank returns its result. A :class:`UserError` there (or a
        ``refusal`` rank 0 already met) is raised on every rank, so all stop with the same one line."""
        outcome = ("error", refusal) if refusal else None
        if self.is_main and outcome is None:
            try:
                outcome = ("ok", choose())
            except UserError as exc:
                if not self.active:
                    raise
                outcome = ("error", str(exc))
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise UserError(outcome[1])
        return outcome[1]

    def sync_buffers(self, module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP broadcasts buffers before each forward, so after an epoch's last step
        each rank still holds statistics updated on its own last batch.
        """
        if not self.active:
            return
        import torch.distributed as td

        for buffer in module.buffers():
            td.broadcast(buffer.data, src=0)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def from_env(backend: str = "gloo") -> Dist:
    """The torchrun environment (RANK, WORLD_SIZE, ...), with a process group initialized; one process otherwise.

    ``backend="nccl"`` binds each rank to its GPU (LOCAL_RANK) first, as NCCL needs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend)
    return Dist(rank=td.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


TORCHRUN_WITHOUT_CWD = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
                        "sys.argv[0] = 'torchrun'; from torch.distributed.run import main; main()")
# Each rank dies with torchrun, as torchrun dies with featcache (see die_with_parent): a killed
# parent never leaves ranks writing parts after it released the cache's lock.
WORKER_LAUNCHER = ("import sys\nfrom featcache.runtime.distributed import die_with_parent\n\ndie_with_parent()\n"
                   "from featcache.cli import entry\n\nentry()\n")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


# A worker that stops on a user mistake writes its message here, so the launcher
# can tell "fix your input" (exit 2) from a crash (torchrun's own non-zero status).
USER_ERROR_FILE_ENV = "FEATCACHE_USER_ERROR_FILE"


def note_user_error(message: str) -> None:
    """Called by a worker's CLI when it exits on a UserError; a no-op outside ``launch``."""
    path = os.environ.get(USER_ERROR_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(message.replace("\n", " ") + "\n")


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``featcache ARGV`` as ``nproc`` local torchrun workers; their exit status.

    2 only when a worker stopped on a user mistake; a crashed worker keeps torchrun's
    status, so a bug or a killed process is never reported as bad input.
    """
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    # torchrun sets OMP_NUM_THREADS=1 (and warns) unless told otherwise; split the cores instead.
    cores = cpu_cores()
    with tempfile.TemporaryDirectory(prefix="featcache-launch-") as scratch:
        note = Path(scratch) / "user-error.txt"
        note.touch()
        # `python -m` puts the working directory first on sys.path, so a ./featcache or ./torch folder
        # there would be imported (and run) instead of the installed packages. torchrun starts without
        # it, and runs each worker from a launcher script whose own folder holds nothing else.
        launcher = Path(scratch) / "featcache_worker.py"
        launcher.write_text(WORKER_LAUNCHER)
        cmd = [sys.executable, "-c", TORCHRUN_WITHOUT_CWD, "--standalone", f"--nproc-per-node={nproc}",
               str(launcher), *argv]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // nproc))),
               USER_ERROR_FILE_ENV: str(note)}
        completed = subprocess.run(cmd, env=env, preexec_fn=die_with_parent)
        user_mistake = bool(note.read_text().strip())
    if completed.returncode == 0:
        return 0
    return 2 if user_mistake else completed.returncode


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc K`` / ``--nproc=K`` (the workers must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
