"""Memory-bounded case workers: the cases in flight never exceed the budget (checked from the workers' own
start/end times), results keep the case order, failures stop the run, budgets come from SLURM or the machine."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest

from pretrain_det3d.data.workers import GIB, MEMORY_HEADROOM, map_cases, memory_budget_bytes


def _record(case: str, folder: str, seconds: float) -> str:
    """Write this case's start and end times (the pool's own view of concurrency)."""
    start = time.time()
    time.sleep(seconds)
    Path(folder, case).write_text(f"{start} {time.time()}")
    return case.upper()


def _peak_in_flight(folder: Path, estimates: dict[str, int]) -> tuple[int, int]:
    """(max summed estimate, max number of cases) running at the same moment, from the recorded intervals."""
    intervals = {case: tuple(map(float, (folder / case).read_text().split())) for case in estimates}
    peak_memory = peak_count = 0
    for case, (start, _) in intervals.items():
        running = [c for c, (s, e) in intervals.items() if s <= start < e]
        peak_memory = max(peak_memory, sum(estimates[c] for c in running))
        peak_count = max(peak_count, len(running))
    return peak_memory, peak_count


def test_budget_limits_the_cases_in_flight(tmp_path: Path) -> None:
    cases = ["a", "b", "c", "d", "e", "f"]
    estimates = {"a": 6, "b": 6, "c": 2, "d": 2, "e": 2, "f": 9}  # budget 10: a and b never together, f alone
    result = map_cases(functools.partial(_record, folder=str(tmp_path), seconds=0.4), cases,
                       [estimates[c] for c in cases], num_workers=3, budget=10, desc="test")
    assert result == ["A", "B", "C", "D", "E", "F"]  # the order of the cases, whatever the finishing order
    peak_memory, peak_count = _peak_in_flight(tmp_path, estimates)
    assert peak_memory <= 10 and peak_count <= 3
    # and the budget is used: small cases did run side by side
    assert peak_count >= 2


def test_without_a_budget_limit_all_workers_run(tmp_path: Path) -> None:
    cases = ["a", "b", "c"]
    map_cases(functools.partial(_record, folder=str(tmp_path), seconds=0.5), cases, [1, 1, 1], num_workers=3,
              budget=100, desc="test")
    assert _peak_in_flight(tmp_path, dict.fromkeys(cases, 1))[1] == 3


def test_a_case_larger_than_the_budget_runs_alone_with_a_warning(tmp_path: Path, capsys) -> None:
    estimates = {"big": 50, "s1": 1, "s2": 1}
    map_cases(functools.partial(_record, folder=str(tmp_path), seconds=0.3), list(estimates),
              list(estimates.values()), num_workers=3, budget=int(10 * GIB), desc="test")
    assert "needs about" not in capsys.readouterr().err  # 50 bytes fit in 10 GiB
    map_cases(functools.partial(_record, folder=str(tmp_path), seconds=0.3), list(estimates),
              list(estimates.values()), num_workers=3, budget=10, desc="test")
    intervals = {c: tuple(map(float, (tmp_path / c).read_text().split())) for c in estimates}
    big_start, big_end = intervals["big"]
    assert all(end <= big_start or start >= big_end for c, (start, end) in intervals.items() if c != "big")
    assert "test: big needs about" in capsys.readouterr().err


def _fail_on(case: str, bad: str) -> str:
    if case == bad:
        raise RuntimeError(f"cannot process {case}")
    return case


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_failure_stops_the_run(num_workers: int) -> None:
    with pytest.raises(RuntimeError, match="cannot process b"):
        map_cases(functools.partial(_fail_on, bad="b"), ["a", "b", "c"], [1, 1, 1], num_workers, 10, "test")


def _die_on(case: str, bad: str) -> str:
    if case == bad:
        os.kill(os.getpid(), 9)  # as the kernel's OOM killer ends a process
    time.sleep(0.2)
    return case


def test_a_killed_worker_is_named_as_a_likely_memory_problem() -> None:
    with pytest.raises(RuntimeError, match=r"test: a worker process died while processing .*b.* lack of memory"):
        map_cases(functools.partial(_die_on, bad="b"), ["a", "b", "c"], [1, 1, 1], 2, 10, "test")


def test_progress_line_per_case(capsys) -> None:
    map_cases(str.upper, ["a", "b"], [1, 1], 1, 10, "demo", on_done=lambda case, result, s: f"done {case}->{result}")
    err = capsys.readouterr().err
    assert "done a->A" in err and "done b->B" in err and "demo" in err


def test_budget_from_setting_slurm_or_machine() -> None:
    assert memory_budget_bytes(2.5) == int(2.5 * GIB)
    assert memory_budget_bytes(environ={"SLURM_MEM_PER_NODE": "8192"}) == int(MEMORY_HEADROOM * 8 * GIB)
    assert memory_budget_bytes(environ={"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "4"}) == int(
        MEMORY_HEADROOM * 4 * GIB)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_budget_bytes(environ={}) == int(MEMORY_HEADROOM * machine)
    with pytest.raises(ValueError, match="2 memory estimates for 3 cases"):
        map_cases(str.upper, ["a", "b", "c"], [1, 1], 1, 10, "x")
