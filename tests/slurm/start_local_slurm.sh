#!/usr/bin/env bash
# Install (Debian packages) and start a one-node SLURM cluster on this machine, for the SLURM tests and CI.
# Idempotent: a running cluster is left alone. Needs root (CI runs as root).
#
# The cluster mirrors what profiles/slurm expects of a site: partitions named `cpu` (default) and `gpu` (the same
# node; it has no GPUs, so GPU jobs use profiles/slurm-cpu on top). No accounting database: `sacct` fails, so the
# Snakemake SLURM executor must be run with `--slurm-status-command squeue`, which tests/slurm/site-profile/ sets
# (with the other options of this test site). `scontrol show config | grep ProctrackType` shows how processes are
# tracked (see SLURM_PROCTRACK below).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "start_local_slurm.sh: needs root to install and start slurmctld/slurmd" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if sinfo -h -p cpu,gpu -o "%P %T" 2>/dev/null | grep -E "idle|mixed|allocated" | grep -q "^gpu"; then
    echo "SLURM already running: $(sinfo -h -o '%P %N %T %c' | tr '\n' ' ')"
    exit 0
fi

HOST=$(hostname -s)
# Process tracking: SLURM_PROCTRACK=linuxproc (default) or cgroup (cgroup v1 freezer; Slurm 22.05's cgroup/v2
# wants systemd's delegation). Measured here with cgroup: SLURM signals other than SIGKILL reach only a step's
# task process, which under Snakemake's SLURM executor is the inner `python -m snakemake`, not the trainer, so the
# time-limit warning never reaches the trainer (README, "Running the paper's study on a cluster"); the trainer's own
# deadline (squeue's end time less PRETRAIN_DET3D_STOP_BEFORE_END_S) stops it instead, and the time-limit test of
# tests/test_workflow_slurm.py passed with both. The default stays linuxproc, which signals every descendant, so the
# test keeps exercising the signal path as well.
PROCTRACK=proctrack/${SLURM_PROCTRACK:-linuxproc}
if [[ $PROCTRACK == proctrack/cgroup ]]; then
    if [[ -d /sys/fs/cgroup/freezer ]] && mkdir -p /sys/fs/cgroup/freezer/slurm 2>/dev/null; then
        mkdir -p /etc/slurm
        cat > /etc/slurm/cgroup.conf <<CGROUP
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
CGROUP
    else
        echo "start_local_slurm.sh: no writable cgroup v1 freezer hierarchy; using proctrack/linuxproc" >&2
        PROCTRACK=proctrack/linuxproc
    fi
fi
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR"
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge

cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=pretrain-det3d-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=$PROCTRACK
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=300
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
CONF

if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged"

if pgrep -x slurmctld >/dev/null; then
    scontrol reconfigure   # running with an older slurm.conf (other partitions): load this one
else
    slurmctld
fi
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 30); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed"; then
        echo "SLURM up ($PROCTRACK): $(sinfo -h -o '%P %N %T %c CPUs' | tr '\n' ' ')"
        exit 0
    fi
    sleep 1
done
echo "start_local_slurm.sh: SLURM did not come up; see /var/log/slurm/" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
