#!/usr/bin/env bash
# A Slurm cluster on this machine, for the test of `rlcore launch slurm` (tests/slurm/).
#
#   scripts/slurm_local.sh start [N]   install slurm-wlm if missing, write slurm.conf, start
#                                      munged, slurmctld and N slurmd (default 1), wait until
#                                      every node is idle
#   scripts/slurm_local.sh stop        stop and remove what `start` started
#
# Both are idempotent. Needs root (apt-get, daemons, network namespaces). Config, spool,
# logs and PID files live in $RLCORE_SLURM_DIR (default /tmp/rlcore-slurm); Slurm's client
# commands find the config through SLURM_CONF:
#
#   export SLURM_CONF=/tmp/rlcore-slurm/slurm.conf
#
# One node: this machine, named localhost. N > 1 nodes: rlnode1 … rlnodeN, each slurmd in a
# network namespace of its own (address $net.11, .12, …, names in /etc/hosts) on a bridge
# to slurmctld at $net.1, with a private /tmp/ray. So every node is a host of its own to
# Slurm, Ray and gloo, as on a cluster — a job step reaches another node only over the
# network — while files (home, the run directory) are shared, like a cluster's file system.
# The nodes share this machine's cores; each tells Slurm it has all of them.
#
# Debian 12 ships Slurm 22.05 with no systemd in containers, so the daemons are started by
# hand, without cgroups (proctrack/linuxproc, task/none) and without accounting.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin
dir=${RLCORE_SLURM_DIR:-/tmp/rlcore-slurm}
conf=$dir/slurm.conf
net=${RLCORE_SLURM_NET:-10.77.0}  # the /24 of the nodes' network (N > 1)
bridge=rlcore-br
hosts_tag="# rlcore-slurm"  # marks the /etc/hosts lines that `stop` removes

log() { echo "slurm_local: $*" >&2; }

# True when the PID in file $1 is a live process. Not a zombie: where PID 1 does not reap
# them (some containers), a daemon's exited process lingers as one.
running() { [ -f "$1" ] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" == [^Z]* ]]; }

install() {
  command -v slurmctld >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null && return
  log "installing slurm-wlm, iproute2 (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm iproute2 util-linux >/dev/null
}

node_names() {  # the names of the $1 nodes
  if [ "$1" = 1 ]; then echo localhost; else for i in $(seq "$1"); do echo "rlnode$i"; done; fi
}

write_conf() {
  local nodes=$1 cpus mem_mb ctl_host node_line
  cpus=$(nproc)
  # slurmd drains a node that has less memory than configured: leave a 10% margin.
  mem_mb=$(awk -v n="$nodes" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 / n }' /proc/meminfo)
  if [ "$nodes" = 1 ]; then
    ctl_host=localhost
    node_line="NodeName=localhost NodeAddr=127.0.0.1"
  else
    ctl_host="localhost($net.1)"  # the address the nodes reach slurmctld at
    node_line="NodeName=rlnode[1-$nodes] NodeAddr=$net.[11-$((10 + nodes))]"
  fi
  mkdir -p "$dir/state" "$dir/spool"
  cat > "$conf" <<EOF
# Written by scripts/slurm_local.sh: $nodes node(s) on this machine, no cgroups, no accounting.
ClusterName=rlcore
SlurmctldHost=$ctl_host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$node_line CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "$nodes" > "$dir/nodes"
}

# Node rlnode$i's network namespace rlcore-rlnode$i, joined to the bridge by a veth pair; its name in /etc/hosts.
make_network() {
  local nodes=$1 i ns
  ip link show "$bridge" >/dev/null 2>&1 || {
    ip link add "$bridge" type bridge
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
  }
  for i in $(seq "$nodes"); do
    ns=rlcore-rlnode$i
    [ -e "/var/run/netns/$ns" ] && continue
    ip netns add "$ns"
    ip link add "rlcore-v$i" type veth peer name eth0 netns "$ns"
    ip link set "rlcore-v$i" master "$bridge" up
    ip -n "$ns" addr add "$net.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$net.1"
    grep -q "^$net.$((10 + i)) rlnode$i " /etc/hosts || echo "$net.$((10 + i)) rlnode$i $hosts_tag" >> /etc/hosts
  done
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

start_slurmd() {  # $1: node name; in the node's network namespace where make_network made one
  local ns=/var/run/netns/rlcore-$1
  mkdir -p "$dir/spool/$1"
  if [ ! -e "$ns" ]; then
    slurmd -f "$conf" -N "$1"
    return
  fi
  # Its own network namespace (nsenter: only the network; `ip netns exec` would also hide
  # /sys/fs/cgroup, which slurmd needs) and mount namespace, where /tmp/ray is the node's own.
  mkdir -p "$dir/tmp-ray/$1"
  nsenter --net="$ns" unshare --mount --propagation private \
    sh -c 'mkdir -p /tmp/ray && mount --bind "$0" /tmp/ray && exec slurmd -f "$1" -N "$2"' "$dir/tmp-ray/$1" "$conf" "$1"
}

wait_idle() {
  local nodes=$1 states deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    states=$(SLURM_CONF=$conf timeout 10 sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
    if [ "$states" = "$nodes idle" ]; then
      log "up: $nodes node(s) idle ($(node_names "$nodes" | xargs), $(nproc) CPUs each); export SLURM_CONF=$conf"
      return
    fi
    sleep 1
  done
  log "nodes not idle after 60 s (states: ${states:-no answer}); see $dir/slurmctld.log and $dir/slurmd-*.log"
  exit 1
}

start() {
  local nodes=${1:-1} name
  [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || { echo "slurm_local: N is a number of nodes, 1 to 99: got '$nodes'" >&2; exit 2; }
  install
  mkdir -p "$dir"
  if [ -f "$dir/nodes" ] && [ "$(cat "$dir/nodes")" != "$nodes" ]; then
    log "a cluster of $(cat "$dir/nodes") node(s) is set up; replacing it"
    stop
  fi
  write_conf "$nodes"
  [ "$nodes" = 1 ] || make_network "$nodes"
  start_munge
  running "$dir/slurmctld.pid" || slurmctld -f "$conf"
  for name in $(node_names "$nodes"); do
    running "$dir/slurmd-$name.pid" || start_slurmd "$name"
  done
  wait_idle "$nodes"
}

stop_daemon() {  # $1: its PID file
  running "$1" || { rm -f "$1"; return; }
  kill "$(cat "$1")"
  for _ in $(seq 20); do running "$1" || break; sleep 0.5; done
  # A slurmd that cannot reach munged ignores SIGTERM.
  if running "$1"; then kill -KILL "$(cat "$1")"; fi
  log "stopped $(basename "$1" .pid)"
  rm -f "$1"
}

stop() {
  local pidfile ns
  for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -e "$pidfile" ] && stop_daemon "$pidfile"
  done
  for ns in $(ip netns list 2>/dev/null | awk '/^rlcore-rlnode[0-9]+/ { print $1 }'); do
    ip netns delete "$ns"  # its end of the veth pair goes with it, and the host's end too
  done
  if ip link show "$bridge" >/dev/null 2>&1; then ip link delete "$bridge"; fi
  if grep -q "$hosts_tag" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount (containers): rewrite it in place, not by rename.
    grep -v "$hosts_tag" /etc/hosts > "$dir/hosts" || true
    cat "$dir/hosts" > /etc/hosts
    rm -f "$dir/hosts"
  fi
  rm -rf "$dir/nodes" "$dir/state"  # slurmctld's saved state names the nodes of this cluster
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  stop) stop ;;
  *) echo "usage: $0 start [N] | stop" >&2; exit 2 ;;
esac
