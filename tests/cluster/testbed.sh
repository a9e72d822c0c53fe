#!/usr/bin/env bash
# A real Slurm cluster on one machine: N compute nodes = N network namespaces on one bridge
# (198.18.0.0/24, a reserved test range; nothing else is contacted), one slurmd per node,
# slurmctld + munged in the root namespace. Recipe: ../shared/SLURM_TESTBED.md (measured).
#   B=/var/tmp/dir N=2 CPUS=2 bash tests/cluster/testbed.sh up|down|node-init-pid I
# Every node has its own netns (rppeth0 198.18.0.1I), hostname nI, /etc/hosts, /tmp, /dev/shm
# and PID namespace. `down` stops only what `up` recorded, by PID (never by process name),
# and removes the namespaces, veths, bridge and mounts. Needs root.
set -euo pipefail
B=${B:-/var/tmp/rpp_slurm_testbed}    # the shared "cluster filesystem" (NOT under /tmp: /tmp is per-node)
N=${N:-2}
CPUS=${CPUS:-2}                       # advertised CPUs per node (config_overrides: need not match the hardware)
GPUS=${GPUS:-0}                       # fake GPUs per node (gres/gpu backed by /dev/null symlinks)
NET=198.18.0
export SLURM_CONF=$B/slurm.conf

up() {
  case "$B" in /tmp|/tmp/*) echo "B=$B must not be under /tmp (each node gets its own /tmp)" >&2; exit 2;; esac
  rm -rf "$B/state" "$B/spool" "$B/log" "$B/nodes"     # fresh cluster state every time
  mkdir -p "$B/munge" "$B/log" "$B/state" "$B/spool" "$B/jobs"
  chmod 755 "$B/munge"
  # --- network: a bridge in the root ns, one veth per node (node end named rppeth0) ----------
  ip link add rppbr0 type bridge
  ip addr add $NET.1/24 dev rppbr0
  ip link set rppbr0 up
  printf '127.0.0.1 localhost\n%s.1 rpphead\n' $NET > "$B/hosts"
  for i in $(seq 1 "$N"); do
    ip netns add rpp_n$i
    ip link add rpp_h$i type veth peer name rppeth0 netns rpp_n$i
    ip link set rpp_h$i master rppbr0
    ip link set rpp_h$i up
    ip -n rpp_n$i link set lo up
    ip -n rpp_n$i addr add $NET.$((10 + i))/24 dev rppeth0
    ip -n rpp_n$i link set rppeth0 up
    echo "$NET.$((10 + i)) n$i" >> "$B/hosts"
    mkdir -p "$B/nodes/n$i/tmp" "$B/spool/n$i"; chmod 1777 "$B/nodes/n$i/tmp"
  done
  # --- munge: one daemon in the root ns; its unix socket is reachable from every netns -------
  [ -f "$B/munge/munge.key" ] || { dd if=/dev/urandom of="$B/munge/munge.key" bs=1024 count=1 status=none
                                   chmod 400 "$B/munge/munge.key"; }
  setsid munged -F --key-file="$B/munge/munge.key" --socket="$B/munge/munge.socket" \
      --pid-file="$B/munge/munged.pid" --log-file="$B/log/munged.log" --seed-file="$B/munge/munged.seed" \
      </dev/null >"$B/log/munged.stdout" 2>&1 &
  echo $! > "$B/munged.outer.pid"
  for _ in $(seq 50); do [ -S "$B/munge/munge.socket" ] && break; sleep 0.1; done
  # --- slurm.conf --------------------------------------------------------------------------
  { cat <<CONF
ClusterName=rpptest
SlurmctldHost=rpphead($NET.1)
AuthType=auth/munge
AuthInfo=socket=$B/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$B/state
SlurmdSpoolDir=$B/spool/%n
SlurmctldPidFile=$B/slurmctld.pid
SlurmdPidFile=$B/spool/slurmd.%n.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$B/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
SlurmdTimeout=120
InactiveLimit=0
KillWait=10
Waittime=0
MinJobAge=600
SlurmdParameters=config_overrides
CONF
    local gres=""; [ "$GPUS" -gt 0 ] && { echo "GresTypes=gpu"; gres="Gres=gpu:$GPUS"; }
    for i in $(seq 1 "$N"); do
      echo "NodeName=n$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS RealMemory=8000 $gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=n[1-$N] Default=YES MaxTime=INFINITE State=UP"
  } > "$B/slurm.conf"
  # fake GPUs: gres/gpu needs File= char devices -> symlinks to /dev/null
  rm -rf "$B/fakegpu" "$B/gres.conf"
  if [ "$GPUS" -gt 0 ]; then
    mkdir -p "$B/fakegpu"; for g in $(seq 0 $((GPUS - 1))); do ln -s /dev/null "$B/fakegpu/nvidia$g"; done
    echo "NodeName=n[1-$N] Name=gpu File=$B/fakegpu/nvidia[0-$((GPUS - 1))]" > "$B/gres.conf"
  fi
  # --- slurmctld: its own UTS ns so that its hostname is the SlurmctldHost ------------------
  setsid unshare --uts sh -c "hostname rpphead && exec slurmctld -D -f $B/slurm.conf" \
      </dev/null >"$B/log/slurmctld.stdout" 2>&1 &
  echo $! > "$B/slurmctld.outer.pid"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  # --- one slurmd per node: netns (nsenter, not `ip netns exec`: that remounts /sys and hides
  # the cgroup mounts) + own UTS, mount (hosts, /tmp, /dev/shm) and PID namespace. PID 1 of the
  # node is a small sh that reaps orphans and forwards SIGTERM to slurmd; when it exits the
  # kernel kills everything left in the node.
  for i in $(seq 1 "$N"); do
    setsid nsenter --net=/run/netns/rpp_n$i unshare --uts --mount --propagation private \
        --pid --fork --mount-proc --kill-child=SIGTERM sh -c "
        mount --bind $B/hosts /etc/hosts &&
        mount --bind $B/nodes/n$i/tmp /tmp &&
        mount -t tmpfs -o size=2g,mode=1777 rpp_shm_n$i /dev/shm &&
        hostname n$i || exit 1
        slurmd -D -N n$i -f $B/slurm.conf & p=\$!
        trap 'kill -TERM \$p' TERM INT
        while kill -0 \$p 2>/dev/null; do wait \$p; done" \
      </dev/null >"$B/log/slurmd.n$i.stdout" 2>&1 &
    echo $! > "$B/slurmd.n$i.outer.pid"
  done
  for _ in $(seq 300); do [ "$(sinfo -h -N -o %T | grep -cx idle)" = "$N" ] && break; sleep 0.2; done
  sinfo -N
  [ "$(sinfo -h -N -o %T | grep -cx idle)" = "$N" ] || { echo "not all $N nodes idle" >&2; exit 1; }
}

# The node's init process (PID 1 inside node I's PID namespace), as a PID of the root namespace.
node_init_pid() {
  local outer; outer=$(cat "$B/slurmd.n$1.outer.pid")
  cat "/proc/$outer/task/$outer/children" 2>/dev/null | awk '{print $1}'
}

down() {
  set +e
  local pids="" targets="" p c munged=""
  ours() { tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline" | grep -qF "$B/"; }   # never signal a reused pid
  for f in "$B"/slurmd.n*.outer.pid "$B/slurmctld.outer.pid"; do
    [ -f "$f" ] && ours "$(cat "$f")" && pids="$pids $(cat "$f")"
  done
  # 'unshare --fork' blocks SIGTERM: signal its child (the node's init sh) instead
  for p in $pids; do
    c=$(cat "/proc/$p/task/$p/children" 2>/dev/null)
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = unshare ] && [ -n "$c" ]; then targets="$targets $c"
    else targets="$targets $p"; fi
  done
  [ -n "$targets" ] && kill -TERM $targets 2>/dev/null
  for _ in $(seq 75); do
    local alive=0; for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && { echo "SIGKILL $p"; kill -KILL "$p"; }; done
  if [ -f "$B/munged.outer.pid" ] && ours "$(cat "$B/munged.outer.pid")"; then
    munged=$(cat "$B/munged.outer.pid"); kill -TERM "$munged" 2>/dev/null
    for _ in $(seq 25); do kill -0 "$munged" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$munged" 2>/dev/null && { echo "SIGKILL munged $munged"; kill -KILL "$munged"; sleep 0.2; }
  fi
  # deleting the host end of a veth is synchronous; 'ip netns del' alone frees it asynchronously
  for ns in $(ip netns list 2>/dev/null | awk '/^rpp_n[0-9]+/{print $1}'); do
    ip link del "rpp_h${ns#rpp_n}" 2>/dev/null; ip netns del "$ns"
  done
  ip link show rppbr0 >/dev/null 2>&1 && ip link del rppbr0
  rm -f "$B"/*.outer.pid
  # what is left of ours (the daemons' outer pids, the namespaces, the bridge) is an error
  local left=""
  for p in $pids ${munged:-}; do kill -0 "$p" 2>/dev/null && left="$left pid $p"; done
  ip netns list 2>/dev/null | grep -q '^rpp_n[0-9]' && left="$left netns($(ip netns list | awk '/^rpp_n/{print $1}' | xargs))"
  ip link show rppbr0 >/dev/null 2>&1 && left="$left bridge rppbr0"
  [ -z "$left" ] || { echo "testbed.sh down: still there:$left" >&2; return 1; }
  return 0
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  node-init-pid) node_init_pid "$2" ;;
  *) echo "usage: $0 up|down|node-init-pid I" >&2; exit 2 ;;
esac
