"""Run one function per case in worker processes while the cases in flight stay within a memory budget.

A preprocessing job on a SLURM node has a fixed memory limit, and the cases of one dataset differ in size by an
order of magnitude (a 512^2 x 800 CT next to a 512^2 x 100 one). :func:`map_cases` therefore gets an estimate of
each case's peak memory (bytes) and starts a case only while the estimates of the cases being processed, plus
its own, fit the budget; up to ``num_workers`` run at once, each holding one case. A case whose estimate alone
exceeds the budget runs by itself (with a warning: the job may need more memory). Results come back in the
order of the cases, one progress line per finished case (tqdm), and the first failure stops the run.

:func:`memory_budget_bytes` is the budget when none is configured: the SLURM job's memory if the process runs
in one (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` x ``SLURM_CPUS_ON_NODE``), else the machine's memory,
times :data:`MEMORY_HEADROOM` (the main process, the interpreter and the libraries need the rest).

Example:
    >>> map_cases(len, ["ab", "c"], estimates=[10, 10], num_workers=1, budget=100, desc="demo")  # doctest: +SKIP
    [2, 1]
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

#: share of the job's (or machine's) memory that the workers' cases may use together
MEMORY_HEADROOM = 0.8
GIB = 1024**3


def memory_budget_bytes(memory_gb: float | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Bytes the workers' cases may use together: ``memory_gb`` if given, else :data:`MEMORY_HEADROOM` times the
    SLURM job's memory, else times the machine's physical memory.

    Example:
        >>> memory_budget_bytes(environ={"SLURM_MEM_PER_NODE": "10240"}) == int(0.8 * 10 * 1024**3)
        True
    """
    if memory_gb is not None:
        return int(float(memory_gb) * GIB)
    environ = os.environ if environ is None else environ
    total = None
    if environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        total = int(environ["SLURM_MEM_PER_NODE"]) * 1024**2  # MB
    elif environ.get("SLURM_MEM_PER_CPU", "").isdigit() and environ.get("SLURM_CPUS_ON_NODE", "").isdigit():
        total = int(environ["SLURM_MEM_PER_CPU"]) * int(environ["SLURM_CPUS_ON_NODE"]) * 1024**2
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(MEMORY_HEADROOM * total)


def map_cases(
    function: Callable[[str], Any],
    cases: Sequence[str],
    estimates: Sequence[int],
    num_workers: int,
    budget: int,
    desc: str,
    on_done: Callable[[str, Any, float], str | None] | None = None,
) -> list[Any]:
    """``[function(case) for case in cases]``, run in up to ``num_workers`` processes within ``budget`` bytes.

    ``estimates[i]`` is the peak memory of ``function(cases[i])`` in bytes. Cases start in the given order as
    soon as a worker is free and their estimate fits next to those running. ``on_done(case, result, seconds)``
    may return a line that is printed (through tqdm) when the case finishes.

    Example:
        >>> map_cases(str.upper, ["a", "b"], [1, 1], num_workers=1, budget=2, desc="x")  # doctest: +SKIP
        ['A', 'B']
    """
    if len(estimates) != len(cases):
        raise ValueError(f"{len(estimates)} memory estimates for {len(cases)} cases")
    results: dict[int, Any] = {}
    progress = tqdm(total=len(cases), desc=desc, unit="case")

    def finished(index: int, result: Any, seconds: float) -> None:
        results[index] = result
        progress.update()
        progress.set_postfix_str(cases[index])
        line = on_done(cases[index], result, seconds) if on_done is not None else None
        if line:
            progress.write(line, file=sys.stderr)

    def warn_if_too_large(index: int) -> None:
        if estimates[index] > budget:
            progress.write(f"{desc}: {cases[index]} needs about {estimates[index] / GIB:.1f} GiB, more than the "
                           f"budget of {budget / GIB:.1f} GiB; it runs alone (give the job more memory if it fails)",
                           file=sys.stderr)

    try:
        if num_workers <= 1 or len(cases) <= 1:
            for index, case in enumerate(cases):
                warn_if_too_large(index)
                start = time.perf_counter()
                finished(index, function(case), time.perf_counter() - start)
            return [results[i] for i in range(len(cases))]
        running: dict[Future, tuple[int, float]] = {}
        next_index = 0
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            try:
                while next_index < len(cases) or running:
                    in_use = sum(estimates[index] for index, _ in running.values())
                    while (next_index < len(cases) and len(running) < num_workers
                           and (not running or in_use + estimates[next_index] <= budget)):
                        warn_if_too_large(next_index)
                        future = pool.submit(function, cases[next_index])
                        running[future] = (next_index, time.perf_counter())
                        in_use += estimates[next_index]
                        next_index += 1
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        index, start = running.pop(future)
                        try:
                            result = future.result()  # re-raises a failure
                        except BrokenProcessPool as error:
                            in_flight = ", ".join(sorted([cases[index]] + [cases[i] for i, _ in running.values()]))
                            raise RuntimeError(
                                f"{desc}: a worker process died while processing {in_flight} (killed for lack of "
                                "memory?); finished cases are kept for the rerun; lower num_workers or memory_gb, "
                                "or give the job more memory") from error
                        finished(index, result, time.perf_counter() - start)
            except BaseException:
                for future in running:
                    future.cancel()
                raise
        return [results[i] for i in range(len(cases))]
    finally:
        progress.close()
