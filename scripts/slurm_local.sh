#!/usr/bin/env bash
# A one-node Slurm on this machine, for the test of `rlcore launch slurm` (tests/slurm/).
#
#   scripts/slurm_local.sh start   install slurm-wlm if missing, write slurm.conf, start
#                                  munged, slurmctld and slurmd, wait until the node is idle
#   scripts/slurm_local.sh stop    stop the daemons that `start` started
#
# Both are idempotent. Needs root (apt-get, daemons). Config, spool, logs and PID files
# live in $RLCORE_SLURM_DIR (default /tmp/rlcore-slurm); Slurm's client commands find the
# config through SLURM_CONF:
#
#   export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf
#
# Debian 12 ships Slurm 22.05 with no systemd in containers, so the daemons are started by
# hand, without cgroups (proctrack/linuxproc, task/none) and without accounting.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin
dir=${RLCORE_SLURM_DIR:-/tmp/rlcore-slurm}
conf=$dir/slurm.conf

log() { echo "slurm_local: $*" >&2; }

# True when the PID in file $1 is a live process. Not a zombie: where PID 1 does not reap
# them (some containers), a daemon's exited process lingers as one.
running() { [ -f "$1" ] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" == [^Z]* ]]; }

install() {
  command -v slurmctld >/dev/null && return
  log "installing slurm-wlm (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # slurmd drains a node that has less memory than configured: leave a 10% margin.
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  mkdir -p "$dir/state" "$dir/spool"
  cat > "$conf" <<EOF
# Written by scripts/slurm_local.sh: one node (this machine), no cgroups, no accounting.
ClusterName=rlcore
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then
    return  # a munged answers (ours from an earlier start, or the system's): use it
  fi
  [ -f /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged  # returns once the daemon runs and has written its PID file
  cp /run/munge/munged.pid "$dir/munged.pid"
}

wait_idle() {
  local state deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(SLURM_CONF=$conf timeout 10 sinfo -h -N -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
      log "up: node localhost idle ($(nproc) CPUs); export SLURM_CONF=$conf"
      return
    fi
    sleep 1
  done
  log "node not idle after 60 s (state: ${state:-no answer}); see $dir/slurmctld.log and $dir/slurmd.log"
  exit 1
}

start() {
  install
  mkdir -p "$dir"
  if running "$dir/slurmctld.pid" && running "$dir/slurmd.pid"; then
    wait_idle
    return
  fi
  write_conf
  start_munge
  running "$dir/slurmctld.pid" || slurmctld -f "$conf"
  running "$dir/slurmd.pid" || slurmd -f "$conf" -N localhost
  wait_idle
}

stop() {
  local name pidfile
  for name in slurmd slurmctld munged; do
    pidfile=$dir/$name.pid
    if running "$pidfile"; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 20); do running "$pidfile" || break; sleep 0.5; done
      # A slurmd that cannot reach munged ignores SIGTERM.
      if running "$pidfile"; then kill -KILL "$(cat "$pidfile")"; fi
      log "stopped $name"
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
