"""``specquant quantize ... --nproc N`` and ``torchrun ... -m specquant quantize ...``: one run over
several ranks (engine/distributed.py).

``--nproc N`` (N > 1) makes this process a launcher: it starts N copies of the same command as
ranks 0..N-1 on this machine (gloo over 127.0.0.1 on a free port, ``OMP_NUM_THREADS`` ranks'
threads, 1 unless set), passes rank 0's output through, and fails with one line naming the rank
when any rank fails; the other ranks are then stopped (SIGTERM, SIGKILL after the collective
timeout), so nothing hangs and rank 0's staged run folder is removed (no partial output).

A process started with ``RANK`` and ``WORLD_SIZE`` > 1 in its environment (by that launcher or by
``torchrun``) is a rank: it joins the process group (``env://`` rendezvous, ``--dist-timeout`` on
every collective), every rank quantizes with its shard of the calibration batches, and only rank 0
evaluates, writes the run folder and prints.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from specquant.cli.common import PROG, CLIError
from specquant.engine.distributed import Dist, default_timeout
from specquant.report.run_folder import PARTIAL_TAG

STOP_GRACE_S = 3.0  # seconds a stopped rank has to unwind before SIGKILL
LOST_PEER = 3  # a rank's exit status when a collective failed (another rank is the cause)
ERROR_PREFIX = f"{PROG}: error: "


def env_ranks() -> tuple[int, int] | None:
    """(rank, world size) when this process was started as one of several ranks, else None."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is None or rank is None:
        return None
    try:
        w, r = int(world), int(rank)
    except ValueError:
        raise CLIError(f"RANK={rank!r} and WORLD_SIZE={world!r} in the environment are not integers") from None
    if w < 1 or not 0 <= r < w:
        raise CLIError(f"RANK={r} is not a rank of WORLD_SIZE={w}")
    return (r, w) if w > 1 else None


def world_size(args, command: str = "quantize") -> int:
    """The number of ranks this run has: ``--nproc``, or ``WORLD_SIZE`` when started as a rank (a
    contradiction between them is one line)."""
    ranks = env_ranks()
    nproc = getattr(args, "nproc", 1)
    if ranks is not None and nproc not in (1, ranks[1]):
        raise CLIError(f"{command}: --nproc {nproc} contradicts WORLD_SIZE={ranks[1]} of this rank's launcher")
    return ranks[1] if ranks is not None else nproc


def wants_ranks(args) -> bool:
    """Whether this ``quantize`` runs over several ranks (``--nproc N`` > 1, or started as a rank);
    refuses, with one line, what does not split over ranks."""
    world = world_size(args)
    if world <= 1:
        return False
    if getattr(args, "act_bits", None) is not None:
        raise CLIError(f"quantize: --act-bits is not supported with {world} ranks (its input samples are drawn "
                       "batch by batch); run it with one process")
    if getattr(args, "smoothquant", None) is not None:
        raise CLIError(f"quantize: --smoothquant is not supported with {world} ranks (it reads its ranges over all "
                       "calibration batches before the walk); run it with one process")
    if args.method.startswith("awq"):
        raise CLIError(f"quantize: --method {args.method} is not supported with {world} ranks (AWQ searches its "
                       "scales over all calibration batches at once); run it with one process")
    return True


def run_ranks(args, argv: list[str], work) -> int:
    """Launch the ranks (``--nproc``), or, in a rank, join the group and run ``work(dist)``."""
    timeout = default_timeout(args.dist_timeout)
    ranks = env_ranks()
    if ranks is None:
        return launch(argv, args.nproc, args.out)
    import torch.distributed as tdist

    signal.signal(signal.SIGTERM, _exit_on_term)  # a stopped rank unwinds: its staged run folder goes
    rank, world = ranks
    backend = "nccl" if str(args.device).startswith("cuda") and _cuda_per_rank() else "gloo"
    try:
        tdist.init_process_group(backend, init_method="env://", timeout=timeout)
    except Exception as e:  # noqa: BLE001 - one line naming the rank
        _say(f"rank {rank}: could not join the {world} ranks at "
             f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {_first_line(e)}")
        return LOST_PEER
    try:
        return work(Dist.current())
    except tdist.DistError as e:
        _say(f"rank {rank}: a collective failed (another rank stopped or timed out after "
             f"{args.dist_timeout:g} s): {_first_line(e)}")
        return LOST_PEER
    except RuntimeError as e:
        if "gloo" not in str(e).lower() and "nccl" not in str(e).lower():
            raise
        _say(f"rank {rank}: a collective failed (another rank stopped or timed out after "
             f"{args.dist_timeout:g} s): {_first_line(e)}")
        return LOST_PEER
    finally:
        tdist.destroy_process_group()


def _cuda_per_rank() -> bool:
    """NCCL needs one GPU per rank on each machine: pin this rank to its own and say whether there is one."""
    import torch

    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not torch.cuda.is_available() or torch.cuda.device_count() < local_world:
        return False
    torch.cuda.set_device(local)
    return True


def _exit_on_term(_signum, _frame):
    sys.exit(128 + signal.SIGTERM)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def _say(line: str) -> None:
    print(ERROR_PREFIX + line, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous of the ranks this launcher starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Rank:
    """One started rank and what it said."""

    rank: int  # its rank
    proc: subprocess.Popen  # the process
    errors: list[str] = field(default_factory=list)  # its "specquant: error: ..." lines
    tail: list[str] = field(default_factory=list)  # its last stderr lines


def _pump(stream, sink, rank: _Rank, forward: bool) -> None:
    """Read a rank's stream line by line: keep its error lines and tail, forward the rest to ``sink``."""
    for line in iter(stream.readline, ""):
        if line.startswith(ERROR_PREFIX):
            rank.errors.append(line[len(ERROR_PREFIX):].strip())
            continue
        rank.tail = (rank.tail + [line.rstrip("\n")])[-5:]
        if forward:
            sink.write(line)
            sink.flush()
    stream.close()


def launch(argv: list[str], nproc: int, out: str | None = None) -> int:
    """Start ``nproc`` ranks of this very command on this machine and wait for them: 0 when all
    succeed (rank 0's output passed through), else one error line naming the failing rank.  A rank
    left waiting in a collective for a failed peer is killed after a short grace, and the run folder
    rank 0 was staging beside ``out`` is removed with it."""
    port = free_port()
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the launcher's modules, user models too
    ranks: list[_Rank] = []
    pumps = []
    try:
        for r in range(nproc):
            env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            proc = subprocess.Popen([sys.executable, "-m", "specquant", *argv], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            ranks.append(_Rank(r, proc))
            pumps.append(threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, ranks[-1], r == 0)))
            pumps.append(threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, ranks[-1], r == 0)))
        for t in pumps:
            t.start()
        failed = _wait(ranks)
    except BaseException:
        _stop(ranks)
        raise
    finally:
        _remove_staging(ranks, out)
    for t in pumps:
        t.join()
    if failed is None:
        return 0
    raise CLIError(_blame(ranks, failed))


def _remove_staging(ranks: list[_Rank], out: str | None) -> None:
    """Remove the hidden staging folders (report/run_folder.py) that killed ranks left beside ``out``."""
    if out is None:
        return
    target = Path(out).absolute()
    for r in ranks:
        if r.proc.returncode is not None and r.proc.returncode < 0:
            for p in target.parent.glob(f".{target.name}{PARTIAL_TAG}{r.proc.pid}-*"):
                shutil.rmtree(p, ignore_errors=True)


def _wait(ranks: list[_Rank]) -> list[_Rank] | None:
    """Wait for every rank; on the first failure stop the others.  The ranks that failed, or None."""
    while True:
        done = [r for r in ranks if r.proc.poll() is not None]
        bad = [r for r in done if r.proc.returncode != 0]
        if bad:
            time.sleep(0.5)  # a peer's own failure usually follows within moments: let it say why
            bad = [r for r in ranks if r.proc.poll() is not None and r.proc.returncode != 0]
            _stop(ranks)
            return bad
        if len(done) == len(ranks):
            return None
        time.sleep(0.1)


def _stop(ranks: list[_Rank]) -> None:
    """SIGTERM every rank still running (it unwinds and removes its staging folder); SIGKILL what is
    left after a grace (a rank blocked inside a collective only sees the signal when it returns)."""
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _blame(ranks: list[_Rank], failed: list[_Rank]) -> str:
    """The one error line of a failed run: the rank that failed on its own, before one that lost a peer."""
    secondary = (LOST_PEER, -signal.SIGTERM, 128 + signal.SIGTERM)  # lost a peer, or stopped by this launcher
    first = sorted(failed, key=lambda r: (r.proc.returncode in secondary, r.rank))[0]
    code = first.proc.returncode
    if first.errors:
        why = first.errors[-1]
        return why if why.startswith(f"rank {first.rank}") else f"rank {first.rank} failed: {why}"
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    last = f" (last output: {first.tail[-1]})" if first.tail else ""
    return f"rank {first.rank} of {len(ranks)} {how} without an error message{last}"
