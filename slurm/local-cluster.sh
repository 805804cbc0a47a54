#!/bin/bash
# A one-node Slurm cluster on this machine, for trying slurm/physim.sbatch under a real scheduler
# (docs/cluster.md, "Tried under a real Slurm"). Needs root and `apt-get install -y slurm-wlm munge`.
# Made for a container: no systemd, no cgroups. Both subcommands can be repeated safely.
#   bash slurm/local-cluster.sh start    # write the config, start munged, slurmctld, slurmd; wait for idle
#   bash slurm/local-cluster.sh stop     # stop the three daemons
set -euo pipefail
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/physim-slurm          # controller state, slurmd spool, logs, pid files
export SLURM_CONF=$CONF

stop() {
  local pidfile pid
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || { rm -f "$pidfile"; continue; }
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done   # up to 20 s to exit
    rm -f "$pidfile"
  done
}

start() {
  command -v slurmctld >/dev/null || { echo "install first: apt-get install -y slurm-wlm munge" >&2; exit 1; }
  mkdir -p "$STATE/ctld" "$STATE/d" /run/munge /var/log/munge /etc/slurm
  chown munge:munge /run/munge /var/log/munge
  local node; node=$(hostname -s)
  # The node line from `slurmd -C`: the real CPUs, sockets, cores and memory of this machine.
  local hw; hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
  cat > "$CONF.new" <<EOF
# Written by slurm/local-cluster.sh: one node, this machine.
ClusterName=physim-local
SlurmctldHost=$node                        # controller and compute node are both this host
SlurmUser=root                             # daemons run as root: no slurm-owned state dirs needed
SlurmdUser=root
AuthType=auth/munge                        # munged, started below, signs the RPCs
AuthInfo=cred_expire=10                    # a requeued job may start again 11 s later (default 121 s)
StateSaveLocation=$STATE/ctld              # job queue state, survives a controller restart
SlurmdSpoolDir=$STATE/d                    # batch scripts of running jobs
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc          # track job processes by parent pid (no cgroups in a container)
TaskPlugin=task/none                       # no CPU binding or cgroup confinement
JobAcctGatherType=jobacct_gather/none      # no per-process accounting
AccountingStorageType=accounting_storage/none   # no slurmdbd, hence no sacct ...
JobCompType=jobcomp/filetxt                # ... but one line per finished (or requeued) job here
JobCompLoc=$STATE/jobcomp.log
SelectType=select/cons_tres                # hand out single CPUs, so two 1-CPU tasks run side by side
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=10       # test pending jobs every 10 s (default 60): requeued tasks restart sooner
MinJobAge=3600                             # keep finished jobs in 'scontrol show job' (Restarts=) for an hour
ReturnToService=2                          # a node that was down comes back once slurmd registers
MpiDefault=none
NodeName=$node $hw State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$CONF.new" "$CONF"; then stop; mv "$CONF.new" "$CONF"; else rm "$CONF.new"; fi  # new config: restart
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  if ! scontrol ping 2>/dev/null | grep -q UP; then
    /usr/sbin/slurmctld
  fi
  if ! pgrep -x slurmd >/dev/null; then
    /usr/sbin/slurmd
  fi
  local i
  for i in $(seq 60); do
    if sinfo -h -N -o "%N %t" 2>/dev/null | grep -Eq "^$node (idle|mix|alloc)"; then
      sinfo -N -o "%N %t %c %m"; return 0
    fi
    # a node left 'down' by an earlier stop (or 'drain' with "Low RealMemory") is set back to service
    if [ "$i" -eq 10 ]; then scontrol update nodename="$node" state=resume 2>/dev/null || true; fi
    sleep 1
  done
  echo "the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  sinfo -N >&2 || true
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
