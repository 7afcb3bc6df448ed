#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, to try the sbatch scripts (and to test them).
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge
#   sudo slurm/local_cluster.sh          # start (idempotent); prints the node's sinfo line
#   sudo slurm/local_cluster.sh stop
set -euo pipefail

state=/var/tmp/dist_train_slurm
if [[ "${1:-start}" == stop ]]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
  exit 0
fi

if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
  # A cluster this script started earlier without CPU binding is restarted with it.
  if scontrol show config 2>/dev/null | grep -qi "^TaskPluginParam *= *cores\$"; then sinfo; exit 0; fi
  for daemon in slurmd slurmctld; do
    [[ -s $state/$daemon.pid ]] && kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
  done
  sleep 2
fi
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done

node=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state"/{ctld,d} /etc/slurm /run/munge /var/log/munge /var/lib/munge

# munge authenticates slurmctld <-> slurmd; a fresh key per machine.
[[ -s /etc/munge/munge.key ]] || mungekey --create --force
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged

# One node, processes tracked through /proc, no cgroups: what works inside a container.
# task/affinity with TaskPluginParam=Cores binds every srun task to as many whole cores as its
# step asked for per task (sched_setaffinity), as clusters that bind by default or constrain
# tasks with cgroups do; under task/none a task sees every CPU of the node, so an srun that
# asked for too few CPUs would go unnoticed.
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=dist_train_local
SlurmctldHost=$node
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.log
KillWait=30
MinJobAge=600
NodeName=$node CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then sinfo; exit 0; fi
  sleep 1
done
echo "error: the SLURM node did not become idle in 60 s; see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
