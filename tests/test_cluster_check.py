"""`python -m pretrain_det3d cluster-check`: one tiny job through the SLURM profiles, reported line by line.

The unit tests feed the report functions what Snakemake and SLURM print (copied from runs on the one-node test
cluster) and run the in-job probe as the job runs it; the cluster tests (marked slurm) submit through the real
profiles to the running one-node cluster (tests/slurm/start_local_slurm.sh) and check every reported line against
what the profiles and the cluster say.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pretrain_det3d import cluster_check as cc
from test_workflow_slurm import proctrack_type, slurm_cluster  # noqa: F401 - the fixture is used by name

# What Snakemake 9 with the SLURM executor plugin 2.8 printed on the test cluster (paths shortened).
SUBMITTED = """\
Building DAG of jobs...
MinJobAge 300s (>= 120s). 'squeue' should work reliably for status queries.
[Tue Dec  1 07:21:41 2026]
rule finetune:
    output: check/done.txt
    log: check/finetune.log
    jobid: 0
    reason: Missing output files: check/done.txt
    threads: 2
    resources: tmpdir=<TBD>, mem_mb=1000, mem=1000 MB, mem_mib=954, disk_mb=50000, disk=50 GB, disk_mib=47684, \
slurm_partition=gpu, runtime=15, gpu=1, slurm_extra='--signal=TERM@600'
Shell command: exec python -m pretrain_det3d.utils.attempt_log finetune check/finetune.log python ...
Job 0 has been submitted with SLURM jobid 119 (log: /w/.snakemake/slurm_logs/rule_finetune/119.log).
"""
GRES_FAILURE = """\
Error in rule finetune:
    message: SLURM sbatch failed. The error message was 'sbatch: error: Invalid generic resource (gres) \
specification'.
    sbatch call:
        sbatch --parsable --job-name x --export=ALL -p gpu -t 15 --mem 1000 --cpus-per-task=1 --signal=TERM@600 ...
"""
PARTITION_FAILURE = """\
Error in rule finetune:
    message: SLURM sbatch failed. The error message was 'sbatch: error: invalid partition specified: nope
sbatch: error: Batch job submission failed: Invalid partition name specified'.
    sbatch call:
"""


def completed(returncode: int, stdout: str = "", stderr: str = ""):
    return lambda *args, **kwargs: subprocess.CompletedProcess(args, returncode, stdout, stderr)


def test_reads_the_job_id_and_what_was_asked():
    assert cc.submitted_job_id(SUBMITTED) == "119"
    assert cc.submitted_job_id(GRES_FAILURE) is None
    asked = cc.requested_resources(SUBMITTED)
    assert asked["slurm_partition"] == "gpu" and asked["gpu"] == "1" and asked["runtime"] == "15"
    assert asked["slurm_extra"] == "'--signal=TERM@600'" and asked["mem"] == "1000 MB"
    assert cc.submission_error(SUBMITTED) is None


def test_sbatch_errors_become_one_line_with_their_fix():
    gres = cc.submission_error(GRES_FAILURE)
    assert gres.startswith("sbatch: Invalid generic resource (gres) specification:"), gres
    assert "profiles/slurm-cpu" in gres and "'" not in gres
    partition = cc.submission_error(PARTITION_FAILURE)
    assert partition.startswith("sbatch: invalid partition specified: nope / Batch job submission failed: Invalid "
                                "partition name specified:"), partition
    assert "slurm_partition" in partition


ACCOUNT_WARNING = "Unable to guess SLURM account. Trying to proceed without.\n"


def test_the_account_warning_is_an_error_only_when_snakemake_ended_without_a_job():
    # the plugin warns before it calls sbatch; on this site sbatch then submits the job (the CI failure of
    # 2026-12-02: the check read the output between the two lines and reported the warning as the error)
    before_sbatch = "Building DAG of jobs...\n" + ACCOUNT_WARNING
    assert cc.submission_error(before_sbatch) is None
    assert cc.submission_error(before_sbatch + SUBMITTED.split("\n", 1)[1]) is None
    ended = cc.submission_error(before_sbatch, snakemake_ended=True)
    assert ended.startswith("sbatch: Unable to guess SLURM account") and "slurm_account" in ended
    # a real sbatch error wins over the warning, with its own hint
    partition = cc.submission_error(ACCOUNT_WARNING + PARTITION_FAILURE, snakemake_ended=True)
    assert partition.startswith("sbatch: invalid partition specified: nope") and "slurm_partition" in partition


def test_the_watch_waits_past_the_account_warning_for_the_job_id(tmp_path):
    # a stand-in for Snakemake that prints the warning, pauses as sbatch does, then reports the submission
    script = (f"import sys, time\nsys.stdout.write({ACCOUNT_WARNING!r}); sys.stdout.flush(); time.sleep(1.5)\n"
              f"sys.stdout.write({SUBMITTED!r}); sys.stdout.flush()\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    reader = cc._Reader(process.stdout)
    reader.start()
    started = time.monotonic()
    obs = cc.Observation(profiles=[], timeout=30)
    try:
        cc._watch(obs, process, reader, tmp_path, lambda: time.monotonic() - started, 30, 0.0, lambda text: None)
    finally:
        process.kill()
        process.wait()
    assert obs.submit_error is None
    assert obs.job_id == "119"
    assert cc.report(obs)[0].name == "submit" and cc.report(obs)[0].verdict != "FAIL"


def test_accounting_and_the_status_command_the_plugin_uses(monkeypatch):
    monkeypatch.setattr(cc.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert cc.sacct_accounting(completed(1, stderr="Slurm accounting storage is disabled\n")) == \
        (False, "Slurm accounting storage is disabled")
    assert cc.sacct_accounting(completed(0, stdout="123 finetune cpu COMPLETED 0:0\n")) == (True, "accounting works")
    monkeypatch.setattr(cc.shutil, "which", lambda name: None)
    assert cc.sacct_accounting(completed(0))[0] is False
    assert cc.min_job_age(completed(0, stdout="MaxJobCount = 10000\nMinJobAge               = 300 sec\n")) == 300
    assert cc.min_job_age(completed(0, stdout="nothing\n")) is None
    # the profile's choice; sacct wherever it is installed; squeue falls back to sacct under 3 x 40 s of MinJobAge
    assert cc.effective_status_command("squeue", True, 300, 40) == "squeue"
    assert cc.effective_status_command("squeue", True, 100, 40) == "sacct"
    assert cc.effective_status_command("squeue", True, 100, 1) == "squeue"
    assert cc.effective_status_command("squeue", False, None, 40) == "squeue"
    assert cc.effective_status_command(None, True, 300, 40) == "sacct"
    assert cc.effective_status_command(None, False, 300, 40) == "squeue"
    assert cc.effective_status_command("sacct", False, 300, 40) == "squeue"


def test_job_states_from_squeue():
    assert cc.parse_job_state("RUNNING|None\n") == ("RUNNING", "None")
    assert cc.parse_job_state("PENDING|Resources\n") == ("PENDING", "Resources")
    assert cc.parse_job_state("") == ("GONE", "")
    assert cc.parse_job_state("CANCELLED by 0|None") == ("CANCELLED", "None")


def test_profiles_merge_by_key_and_the_partition_overlay_keeps_the_signal(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "config.yaml").write_text(yaml.safe_dump({
        "executor": "slurm", "set-resources": {"finetune": {"gpu": 1, "slurm_extra": "'--signal=TERM@600'"}}}))
    (second / "config.yaml").write_text(yaml.safe_dump({
        "set-resources": {"finetune": {"slurm_extra": "'--signal=TERM@600'"}, "pretrain": {"gpu": 0}}}))
    settings = cc.merged_settings([first, second])
    assert settings["executor"] == "slurm"
    assert settings["set-resources"] == {"finetune": {"slurm_extra": "'--signal=TERM@600'"}, "pretrain": {"gpu": 0}}
    overlay = cc.partition_overlay(settings, "short")
    assert overlay == {"set-resources": {"finetune": {"slurm_extra": "'--signal=TERM@600'", "slurm_partition": "short"},
                                         "pretrain": {"gpu": 0}}}
    assert settings["set-resources"]["finetune"] == {"slurm_extra": "'--signal=TERM@600'"}  # not changed in place
    listed = cc.partition_overlay({"set-resources": ["finetune:gpu=1"]}, "short")
    assert listed == {"set-resources": ["finetune:gpu=1", "finetune:slurm_partition=short"]}
    assert cc.resolve_profile("b", cwd=tmp_path) == second.resolve()
    with pytest.raises(FileNotFoundError, match="no-such-profile"):
        cc.resolve_profile("no-such-profile", cwd=tmp_path)


def observation(**changes) -> cc.Observation:
    values = dict(
        profiles=["profiles/slurm"], job_id="7", threads=2, requested=cc.requested_resources(SUBMITTED),
        info={"partition": "gpu", "node": "n1", "cpus_per_task": "2", "nproc": 2, "cuda_visible_devices": "0",
              "nvidia_smi": "GPU 0: NVIDIA H100 (UUID: GPU-1)", "torch_gpus": 1,
              "deadline": {"ok": True, "end": "2026-12-01T08:00:00", "seconds_left": 890, "margin_s": 600.0}},
        signal_sent_at=5.0, events=["received SIGTERM at 1.0 (pid 3)"], job_ended_at=6.0, job_final_state="FAILED",
        snakemake_returned_at=20.0, snakemake_returncode=1, status_command="squeue", sacct_ok=False,
        sacct_said="Slurm accounting storage is disabled")
    values.update(changes)
    return cc.Observation(**values)


def as_dict(lines):
    return {line.name: (line.verdict, line.text) for line in lines}


def test_report_of_a_good_gpu_site():
    lines = cc.report(observation())
    report = as_dict(lines)
    assert list(report) == ["submit", "placement", "resources", "signal", "deadline", "status"]
    assert all(verdict == "OK" for verdict, _ in report.values()), report
    assert "job 7" in report["submit"][1] and "partition gpu" in report["submit"][1]
    assert "--signal=TERM@600" in report["submit"][1] and "gpu 1" in report["submit"][1]
    assert report["placement"][1] == "partition gpu, node n1"
    assert "2 CPUs per task, 2 usable (asked 2)" in report["resources"][1]
    assert "CUDA_VISIBLE_DEVICES=0" in report["resources"][1] and "NVIDIA H100" in report["resources"][1]
    assert "noticed the job's end 14 s after it" in report["status"][1]
    assert "needs squeue" in report["status"][1]
    assert str(lines[0]).startswith("submit     OK   job 7")


def test_report_flags_what_would_hurt_the_study():
    # fewer CPUs than asked, a GPU asked but none seen, the signal lost on the way, no end time from squeue
    report = as_dict(cc.report(observation(
        info={**observation().info, "nproc": 1, "cpus_per_task": "1", "torch_gpus": 0, "cuda_visible_devices": None,
              "nvidia_smi": None, "deadline": {"ok": False, "why": "squeue failed inside the job: boom"}},
        events=["no SIGTERM within 30 s"])))
    assert report["resources"][0] == "WARN" and "(asked 2)" in report["resources"][1]
    assert "CUDA_VISIBLE_DEVICES=(unset)" in report["resources"][1] and "(no nvidia-smi)" in report["resources"][1]
    assert report["signal"][0] == "WARN" and "no SIGTERM within 30 s" in report["signal"][1]
    assert "ProctrackType" in report["signal"][1]
    assert report["deadline"][0] == "WARN" and "boom" in report["deadline"][1]
    assert "periodic checkpoint" in report["deadline"][1]
    # no --signal for the rule in the profile
    report = as_dict(cc.report(observation(requested={"slurm_partition": "cpu"})))
    assert report["submit"][0] == "WARN" and "no --signal" in report["submit"][1]


def test_report_of_status_polling_that_never_ends():
    stuck = observation(snakemake_returned_at=None, snakemake_returncode=None, gave_up_at=37.0, status_command="sacct")
    verdict, text = as_dict(cc.report(stuck))["status"]
    assert verdict == "FAIL" and "ended 31 s ago" in text
    assert "no accounting" in text and "--slurm-status-command squeue" in text
    # the same wait with working accounting blames the status command, not accounting
    verdict, text = as_dict(cc.report(observation(snakemake_returned_at=None, gave_up_at=37.0, sacct_ok=True,
                                                  status_command="sacct")))["status"]
    assert verdict == "FAIL" and "no accounting" not in text and "sacct does not report the job" in text


def test_report_of_failures_before_the_job_runs():
    report = as_dict(cc.report(observation(job_id=None, submit_error="sbatch: Invalid partition name specified")))
    assert report == {"submit": ("FAIL", "sbatch: Invalid partition name specified")}
    report = as_dict(cc.report(observation(info=None, timed_out=True, timeout=60, job_ended_at=None,
                                           snakemake_returned_at=None, job_final_state="PENDING",
                                           job_reason="Resources")))
    assert report["placement"] == ("FAIL", "timeout (60 s): the job never ran the probe; its state: PENDING "
                                           "(reason: Resources)")
    assert report["status"][0] == "FAIL" and "timeout" in report["status"][1]
    failed = as_dict(cc.report(observation(info=None, job_final_state="FAILED", events=[])))
    assert failed["placement"][0] == "FAIL" and "state: FAILED" in failed["placement"][1]
    assert "shared file system" in failed["placement"][1]
    report = as_dict(cc.report(observation(job_id=None, timed_out=True)))
    assert report["submit"][0] == "FAIL" and report["submit"][1].startswith("timeout")


def test_no_sbatch_on_path_or_no_profile_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(cc.shutil, "which", lambda name: None)
    lines, kept = cc.run_check(["profiles/slurm"], workdir=tmp_path)
    assert [(line.name, line.verdict) for line in lines] == [("submit", "FAIL")]
    assert "no `sbatch` on PATH" in lines[0].text and kept is None
    monkeypatch.setattr(cc.shutil, "which", lambda name: f"/usr/bin/{name}")
    lines, kept = cc.run_check([str(tmp_path / "no-such-profile")], workdir=tmp_path)
    assert [(line.name, line.verdict) for line in lines] == [("submit", "FAIL")]
    assert "cannot read the profiles" in lines[0].text and "no-such-profile" in lines[0].text
    assert not list(tmp_path.iterdir()), "nothing written before the profiles are read"


def run_probe(tmp_path, wait_s, send_signal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(SLURM_CPUS_PER_TASK="3", CUDA_VISIBLE_DEVICES="1,2")
    files = {name: tmp_path / name for name in ("info.json", "events.txt", "done.txt")}
    process = subprocess.Popen(
        [sys.executable, "-m", "pretrain_det3d.cluster_check", "probe", "--info", str(files["info.json"]),
         "--events", str(files["events.txt"]), "--out", str(files["done.txt"]), "--wait", str(wait_s)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not files["info.json"].exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if send_signal:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return json.loads(files["info.json"].read_text()), files["events.txt"].read_text(), output


def test_the_probe_reports_the_signal(tmp_path):
    info, events, output = run_probe(tmp_path, wait_s=60, send_signal=True)
    assert events.startswith(cc.SIGNAL_LINE), events
    assert info["cpus_per_task"] == "3" and info["cuda_visible_devices"] == "1,2"
    assert info["nproc"] == len(os.sched_getaffinity(0)) and info["node"] == socket.gethostname()
    assert info["deadline"] == {"ok": False, "why": "no SLURM_JOB_ID in the job's environment"}
    assert "cluster-check probe running" in output


def test_the_probe_says_when_no_signal_came(tmp_path):
    _, events, _ = run_probe(tmp_path, wait_s=0.2, send_signal=False)
    assert events == "no SIGTERM within 0.2 s\n"


# ------------------------------------------------------------------------------------------------------------------
# on the one-node cluster

PROFILES = [str(REPO / "profiles" / "slurm"), str(REPO / "profiles" / "slurm-cpu")]
SITE = str(REPO / "tests" / "slurm" / "site-profile")


def wait_for_idle_queue(limit_s: float = 90.0) -> None:
    """Wait until no job of an earlier check is pending, running or completing on the one test node: a job that
    is still COMPLETING holds the node, and the next check's probe would then miss its steps."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        states = subprocess.run(["squeue", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
        if not states:
            return
        time.sleep(1)


def cluster_check(tmp_path, *args, timeout=300):
    wait_for_idle_queue()
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pretrain_det3d", "cluster-check", "--workdir", str(tmp_path),
                             *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    lines = {}
    for line in result.stdout.splitlines():
        found = re.match(r"(\w+)\s+(OK|WARN|FAIL|SKIP)\s+(.*)", line)
        if found:
            lines[found.group(1)] = (found.group(2), found.group(3))
    return result, lines


def node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])


@pytest.mark.slow
@pytest.mark.slurm
def test_cluster_check_through_the_real_profiles(tmp_path, slurm_cluster):  # noqa: F811
    threads = min(2, node_cpus())
    profile_args = [arg for p in [*PROFILES, SITE] for arg in ("--profile", p)]
    started = time.monotonic()
    result, lines = cluster_check(tmp_path, *profile_args, "--threads", str(threads))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(lines) == ["submit", "placement", "resources", "signal", "deadline", "status"], result.stdout
    # what the profiles ask for the study's fine-tuning: partition (slurm-cpu drops the GPU one) and the signal
    settings = cc.merged_settings([Path(p) for p in [*PROFILES, SITE]])
    finetune = settings["set-resources"]["finetune"]
    partition = finetune.get("slurm_partition", settings["default-resources"]["slurm_partition"])
    signal_option = re.search(r"--signal=\S+?(?=')", finetune["slurm_extra"]).group(0)
    verdict, text = lines["submit"]
    assert verdict == "OK" and f"partition {partition}, {threads} thread(s), no GPU asked" in text, text
    assert f"time-limit warning {signal_option}" in text, text
    job_id = re.search(r"job (\d+)", text).group(1)
    node = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%N"], capture_output=True,
                          text=True).stdout.strip()
    assert node, f"squeue no longer lists job {job_id}"
    assert lines["placement"] == ("OK", f"partition {partition}, node {node}")
    verdict, text = lines["resources"]
    assert verdict == "OK" and text.startswith(f"{threads} CPUs per task"), text
    assert "CUDA_VISIBLE_DEVICES=(unset)" in text and "torch sees 0" in text
    # linuxproc signals every process of the step, cgroup only the step's task (README's cluster section)
    expected = "OK" if proctrack_type() == "proctrack/linuxproc" else "WARN"
    assert lines["signal"][0] == expected, (proctrack_type(), lines["signal"])
    verdict, text = lines["deadline"]
    assert verdict == "OK" and re.search(r"end time \(\S+, \d+ s left\): the trainer stops 600 s before it", text)
    verdict, text = lines["status"]
    assert verdict == "OK" and "status command squeue" in text, text
    accounting = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True)
    needs = "sacct (the default)" if accounting.returncode == 0 else "squeue"
    assert f"this site needs {needs}" in text, text
    assert took < 90, f"the check took {took:.0f} s"
    assert not list(tmp_path.glob(".cluster-check-*")), "a passing check leaves no scratch folder"


@pytest.mark.slow
@pytest.mark.slurm
def test_cluster_check_finds_the_missing_status_command(tmp_path, slurm_cluster):  # noqa: F811
    if subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0:
        raise AssertionError("this test needs a cluster without accounting (tests/slurm/start_local_slurm.sh)")
    # the study's profiles without the test site's `slurm-status-command: squeue` (and account setting)
    result, lines = cluster_check(tmp_path, *[arg for p in PROFILES for arg in ("--profile", p)],
                                  "--status-grace", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines["signal"][0] in ("OK", "WARN") and lines["placement"][0] == "OK", result.stdout
    verdict, text = lines["status"]
    assert verdict == "FAIL" and "has not noticed" in text and "--slurm-status-command squeue" in text, text
    assert "Slurm accounting storage is disabled" in text
    kept = list(tmp_path.glob(".cluster-check-*"))
    assert len(kept) == 1 and (kept[0] / "check" / "finetune.log").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_cluster_check_reports_sbatch_errors_and_timeouts(tmp_path, slurm_cluster):  # noqa: F811
    # profiles/slurm alone asks for a GPU, which the test node does not have
    result, lines = cluster_check(tmp_path, "--profile", PROFILES[0], "--profile", SITE)
    assert result.returncode == 1 and list(lines) == ["submit"], result.stdout + result.stderr
    assert lines["submit"][0] == "FAIL" and "Invalid generic resource (gres)" in lines["submit"][1]
    result, lines = cluster_check(tmp_path, *[arg for p in [*PROFILES, SITE] for arg in ("--profile", p)],
                                  "--partition", "no-such-partition")
    assert result.returncode == 1 and lines["submit"][0] == "FAIL", result.stdout
    assert "invalid partition specified: no-such-partition" in lines["submit"][1]
    # the probe cannot be running two seconds after the start (Snakemake alone takes longer to submit)
    result, lines = cluster_check(tmp_path, *[arg for p in [*PROFILES, SITE] for arg in ("--profile", p)],
                                  "--timeout", "2")
    assert result.returncode == 1, result.stdout
    assert any(verdict == "FAIL" and "timeout" in text for verdict, text in lines.values()), result.stdout
    job = re.search(r"job (\d+)", lines.get("submit", ("", ""))[1])
    if job:  # a job submitted before the timeout is cancelled, not left in the queue
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job.group(1), "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        # COMPLETING: the cancel took effect and the job is ending, no longer running
        assert state in ("", "CANCELLED", "COMPLETING", "COMPLETED", "FAILED"), state
