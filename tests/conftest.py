"""Shared fixtures: running Snakemake on this repository's workflow in a scratch working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run beside each other and beside workflow jobs on small machines; torch's default of one thread per core
# then oversubscribes the CPU and slows tiny networks down about tenfold (measured here). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SMOKE_CONFIG = REPO / "tests" / "configs" / "smoke.yaml"


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = SMOKE_CONFIG, check: bool = True,
                  timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the workflow with ``workdir`` as working directory; the interpreter's bin dir leads PATH."""
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        command += ["--configfile", str(configfile)]
    command += list(args)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture
def snakemake_runner():
    return run_snakemake


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Working directory of the smoke study run to the end, once per test session, shared by every test module.

    ``$PRETRAIN_DET3D_SMOKE_WORKDIR`` names a folder to use instead of a fresh one (Snakemake still brings it up
    to date, a no-op for a finished run), to iterate on report tests without rerunning the study.
    """
    given = os.environ.get("PRETRAIN_DET3D_SMOKE_WORKDIR")
    workdir = Path(given) if given else tmp_path_factory.mktemp("smoke")
    run_snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture(scope="session")
def smoke_report(smoke_run):
    """The self-contained HTML report (``snakemake --report``) of the finished smoke study."""
    run_snakemake(smoke_run, "--report", "results/report.html")
    return smoke_run / "results" / "report.html"
