#!/usr/bin/env bash
# A one-node SLURM cluster in DIR, without systemd: to try deploy/slurm-array.sbatch on one machine.
#   deploy/slurm-local/up.sh /tmp/slurm && . /tmp/slurm/env     # SLURM_CONF for sbatch, squeue, scancel
#   ALPA_TUNE_DEVICE=cpu sbatch --array=0-1 --gres=none --cpus-per-task=1 --mem=2G \
#       deploy/slurm-array.sbatch STUDY_NAME
#   deploy/slurm-local/down.sh /tmp/slurm
# Needs Debian's slurm-wlm and munge (no daemon of theirs running is needed: munged, slurmctld
# and slurmd run here with their own key, socket, state and pid files, all under DIR).
# Ports: $SLURMCTLD_PORT and $SLURMD_PORT (default 6817 and 6818).
set -euo pipefail
dir=$(realpath -m "${1:?usage: deploy/slurm-local/up.sh DIR}")
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
for tool in munged mungekey slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
for port in "$ctld_port" "$slurmd_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "error: port $port is taken (set SLURMCTLD_PORT / SLURMD_PORT)" >&2; exit 2
    fi
done
if [ -e "$dir/slurm.conf" ]; then
    echo "error: $dir already holds a cluster (deploy/slurm-local/down.sh $dir first)" >&2; exit 2
fi
mkdir -p "$dir"/{munge,state,spool,log}
chmod 755 "$dir" "$dir/munge"  # munged wants its socket dir searchable by all, writable by us only

node=$(hostname -s)
user=$(id -un)
cpus=$(nproc)
# RealMemory a little under the machine's: slurmd drains a node that claims more than it has.
memory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

mungekey --create --keyfile="$dir/munge/munge.key"
# The marker lets down.sh find this cluster's processes (slurmstepd inherits it) and no others.
export ALPA_SLURM_LOCAL="$dir"
munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

cat > "$dir/slurm.conf" <<CONF
# Written by deploy/slurm-local/up.sh: one node, everything under $dir.
ClusterName=alpalocal
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
# No cgroups, no systemd: track a job's processes by their parent pids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem gets 1 GB per CPU, not the whole node (which would run jobs one at a time).
DefMemPerCPU=1024
# Time between SIGTERM and SIGKILL (scancel, time limit): enough for a worker to finish its epoch.
KillWait=30
ReturnToService=2
# sbatch --wait polls at 2, 8, then 32 s intervals while the interval is under MinJobAge/2:
# 16 keeps it at 8 s. Finished jobs stay listed (squeue -t all, scontrol) for 16 to 76 s.
MinJobAge=16
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -i      # both daemonize and write their pid files
slurmd -N "$node"
for _ in $(seq 1 60); do
    if [ "$(sinfo -h -n "$node" -o %t 2>/dev/null)" = idle ]; then
        echo "SLURM cluster up in $dir: node $node, $cpus CPUs, ${memory} MB; . $dir/env"
        exit 0
    fi
    sleep 0.5
done
echo "error: node $node did not come up within 30 s; logs in $dir/log; deploy/slurm-local/down.sh $dir stops the rest" >&2
sinfo -N -l >&2 || true
exit 1
