#!/usr/bin/env bash
# Stop the cluster that up.sh started in DIR: cancel its jobs, stop its daemons by their pid
# files, then any process still carrying its marker (a slurmstepd left behind). Removes nothing
# else; `rm -rf DIR` afterwards if you wish.
set -uo pipefail
dir=$(realpath -m "${1:?usage: deploy/slurm-local/down.sh DIR}")
export SLURM_CONF="$dir/slurm.conf"

if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null
    # Up to KillWait (30 s) and a little more for the jobs' processes to go.
    for _ in $(seq 1 80); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING,CONFIGURING -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

ours() {  # does PID carry this cluster's marker? (a stale pid file may name someone else's process)
    tr '\0' '\n' 2>/dev/null < "/proc/$1/environ" | grep -qxF "ALPA_SLURM_LOCAL=$dir"
}
stop() {  # stop PID if it is ours: TERM, up to 10 s, then KILL
    local pid=$1
    ours "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null
}
for name in slurmd slurmctld munge/munged; do
    [ -f "$dir/$name.pid" ] && stop "$(cat "$dir/$name.pid")"
done
for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    [ "$pid" != $$ ] && stop "$pid"
done
echo "SLURM cluster in $dir stopped"
