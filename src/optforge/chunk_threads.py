"""Run independent pieces of a CPU step on a few threads, each piece's torch ops on one thread.

Why: a chunked eager step is a long run of short torch ops (tens of microseconds each). Run
from one thread, each op is a parallel region of torch's OpenMP team: on a quiet CPU that is
as fast as the alternative below, but on a CPU shared with other processes each region waits at
its barrier for descheduled threads, and a step can take ten times longer (measured on 2 cores
beside other jobs: 266-303 ms against 56-77 ms for the same AdamW update of 16.8M entries).

What: :func:`run` hands the pieces round-robin to ``workers`` Python threads and sets torch's
thread count to 1 while they run (torch ops release the GIL, so the threads compute at once;
each op then runs where it is called, without a parallel region). torch's thread count is
process-wide, so other threads of the process run single-threaded torch ops while a step is in
this function; it is restored before :func:`run` returns or raises. Each piece must touch
memory no other piece touches; the results are then the same as running the pieces in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

__all__ = ["MAX_WORKERS", "STEP_THREADS", "run", "workers"]

#: At most this many threads run a step's pieces (the GIL-held Python of each piece is serial).
MAX_WORKERS = 8

#: Whether the chunked eager steps (:mod:`optforge.eager_chunks`, and the eager low-bit step)
#: run their chunks on worker threads. Off by default: on a quiet 2-core CPU the chunks on
#: torch's OpenMP threads were faster (threads took 1.13-1.37x their time); beside other busy
#: processes the worker threads were 3-25x faster. Set it (or ``OPTFORGE_STEP_THREADS=1`` in
#: the environment) where the CPU is shared.
STEP_THREADS: bool = os.environ.get("OPTFORGE_STEP_THREADS", "") == "1"

_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools() -> None:     # a forked child has none of the parent's threads
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def workers() -> int:
    """How many threads :func:`run` uses: torch's intra-op thread count, at most MAX_WORKERS."""
    return max(1, min(torch.get_num_threads(), MAX_WORKERS))


def _pool(n: int) -> ThreadPoolExecutor:
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="optforge-chunks")
    return pool


def _run_share(fn: Callable[[Any], None], share: Sequence[Any], grad_enabled: bool) -> None:
    with torch.set_grad_enabled(grad_enabled):   # grad mode is per thread
        for piece in share:
            fn(piece)


def run(fn: Callable[[Any], None], pieces: Sequence[Any], threaded: bool = True) -> None:
    """``fn(piece)`` for every piece: on :func:`workers` threads when ``threaded`` and there
    are several threads and pieces, else (or while ``torch.compile`` traces) in this thread.
    Raises the first error a piece raised, after every thread has stopped."""
    n = min(workers(), len(pieces)) if threaded else 1
    if n <= 1 or torch.compiler.is_compiling():
        for piece in pieces:
            fn(piece)
        return
    threads = torch.get_num_threads()
    grad_enabled = torch.is_grad_enabled()
    torch.set_num_threads(1)
    try:
        pool = _pool(n)
        futures = [pool.submit(_run_share, fn, pieces[k::n], grad_enabled) for k in range(n)]
        wait(futures)
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)
