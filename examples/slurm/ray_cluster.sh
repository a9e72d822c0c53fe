# Ray inside a Slurm allocation: sourced by train.sbatch (bash, inside the batch step).
#
#   rpp_ray_up          start the Ray head on this node (the batch host) and one Ray worker on
#                       every other node, then wait until every node has joined (bounded;
#                       the error names the missing nodes). Exports RAY_ADDRESS. A `ray start`
#                       that exits before the cluster is up (e.g. a raylet that did not register
#                       within Ray's fixed 30 s on an overloaded node) makes it stop every node's
#                       Ray and start again, up to RPP_RAY_START_ATTEMPTS times in all.
#   rpp_run_controller  run a command (the controller) while watching the Ray nodes; returns
#                       its exit code. A Ray node that dies meanwhile is logged; a controller
#                       that has not stopped RPP_NODE_LOSS_GRACE s later is stopped.
#   rpp_ray_down        stop every Ray node started here: SIGTERM to each `srun ... ray start`
#                       step, which makes Slurm end the step and kill all of its processes
#                       (ray start, raylet, GCS, workers); SIGKILL to the srun after
#                       RPP_RAY_STOP_TIMEOUT s. Idempotent; train.sbatch runs it on EXIT.
#   rpp_on_signal SIG   scancel / preemption (TERM, INT): stop the controller and Ray, exit 143.
#                       USR1 (--signal=B:USR1@SECONDS before the time limit): the same, then
#                       `scontrol requeue` this job, which continues from its newest checkpoint.
#
# Never `ray stop`: it kills every Ray process of the user on the machine by name, and
# `ray start --block` keeps running after it. Knobs (environment):
: "${RPP_PYTHON:=python}"                 # a python that imports megatron_rpp and ray
: "${RPP_RAY:=ray}"                       # the ray CLI
: "${RPP_RAY_PORT:=6379}"                 # the head's GCS port
: "${RPP_RAY_JOIN_TIMEOUT:=300}"          # s for the head to listen and every node to join (per attempt)
: "${RPP_RAY_START_ATTEMPTS:=2}"         # bring-ups tried when a `ray start` exits before all joined
: "${RPP_RAY_STOP_TIMEOUT:=30}"           # s for a `ray start` step to end after SIGTERM
: "${RPP_NODE_LOSS_GRACE:=90}"            # s the controller gets to stop after a Ray node died
: "${RPP_CONTROLLER_STOP_TIMEOUT:=30}"    # s the controller gets to stop after SIGTERM
: "${RPP_RAY_HEAD_ARGS:=--include-dashboard=false}"   # extra `ray start` args on the head
: "${RPP_RAY_NODE_ARGS:=}"                # extra `ray start` args on every node
: "${RPP_LOG_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/logs/slurm-${SLURM_JOB_ID:-0}}"  # per-node Ray logs
# How fast Ray declares a silent node dead (no TCP reset: a node or link that vanished): every
# period one health check with this timeout, dead after this many failures in a row. Ray's
# defaults (3 s, 10 s, 5) take ~65 s; these ~40 s, so that the controller stops within a minute.
export RAY_health_check_period_ms=${RAY_health_check_period_ms:-3000}
export RAY_health_check_timeout_ms=${RAY_health_check_timeout_ms:-5000}
export RAY_health_check_failure_threshold=${RAY_health_check_failure_threshold:-5}
# RPP_HEAD_IP: the head's address (default: this node's source address toward the 2nd node,
# i.e. the interface the other nodes reach it on).

RPP_RAY_PIDS=()     # the `srun ... ray start --block` processes (in the batch step)
RPP_RAY_NODES=()    # their node names
RPP_CONTROLLER_PID=""

rpp_log() { echo "[ray_cluster $(date +%H:%M:%S)] $*"; }

# Succeeds when a Ray step has exited: its node in RPP_DEAD_NODE, its exit code in RPP_DEAD_RC.
# (No $(...) here: a subshell can neither wait for our children nor set our variables.)
rpp_find_dead_ray_node() {
  local i
  for i in "${!RPP_RAY_PIDS[@]}"; do
    if ! kill -0 "${RPP_RAY_PIDS[$i]}" 2>/dev/null; then
      RPP_DEAD_NODE=${RPP_RAY_NODES[$i]} RPP_DEAD_RC=0
      wait "${RPP_RAY_PIDS[$i]}" 2>/dev/null || RPP_DEAD_RC=$?
      return 0
    fi
  done
  return 1
}

# rpp_start_node NODE ARGS...: `ray start --block ARGS` as a one-task step on NODE. Its CPUs
# and GPUs are what Slurm gave the step there (CPU-only nodes: --num-gpus=0). With
# RPP_JOIN=1 the node joins RAY_ADDRESS with its own address toward the head.
rpp_start_node() {
  local node=$1; shift
  # shellcheck disable=SC2016  # expanded on the node
  srun --overlap --nodes=1 --ntasks=1 -w "$node" --output="$RPP_LOG_DIR/ray_$node.log" \
    --export="ALL,RPP_JOIN=${RPP_JOIN:-0},RPP_RAY_STEP=${SLURM_JOB_ID:-0}" \
    bash -c 'args=("$@")
      if [ "${RPP_JOIN:-0}" = 1 ]; then
        ip=$("$RPP_PYTHON" -m megatron_rpp.parallel.network ip-toward "$RPP_HEAD_IP") || exit 1
        args+=(--address="$RAY_ADDRESS" --node-ip-address="$ip")
      fi
      exec "$RPP_RAY" start --block --disable-usage-stats --num-cpus="${SLURM_CPUS_ON_NODE:-1}" \
        --num-gpus="${SLURM_GPUS_ON_NODE:-0}" --labels="slurm-node=$SLURMD_NODENAME" "${args[@]}"' \
    ray-node "$@" &
  RPP_RAY_PIDS+=("$!"); RPP_RAY_NODES+=("$node")
}

rpp_ray_up() {
  local attempt rc
  for (( attempt = 1; ; attempt++ )); do
    rc=0; rpp_ray_up_once || rc=$?
    [ "$rc" = 0 ] && return 0
    if [ "$rc" != 3 ] || (( attempt >= RPP_RAY_START_ATTEMPTS )); then return 1; fi
    rpp_log "Ray bring-up attempt $attempt/$RPP_RAY_START_ATTEMPTS failed: stopping Ray on every node, starting again"
    rpp_stop_ray_steps
    RPP_RAY_PIDS=() RPP_RAY_NODES=()
  done
}

# One bring-up; returns 3 when a `ray start` exited (worth another attempt), 1 otherwise.
rpp_ray_up_once() {
  local nodes head peer node waiter rc=0 t0=$SECONDS
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${SLURMD_NODENAME:-${nodes[0]}}     # the batch host: the controller runs here too
  mkdir -p "$RPP_LOG_DIR"
  peer=$head
  for node in "${nodes[@]}"; do if [ "$node" != "$head" ]; then peer=$node; break; fi; done
  if [ -z "${RPP_HEAD_IP:-}" ]; then
    RPP_HEAD_IP=$("$RPP_PYTHON" -m megatron_rpp.parallel.network ip-toward "$peer") || {
      rpp_log "error: cannot find this node's address toward $peer (set RPP_HEAD_IP)"; return 1; }
  fi
  export RAY_ADDRESS="$RPP_HEAD_IP:$RPP_RAY_PORT" RPP_HEAD_IP RPP_PYTHON RPP_RAY
  rpp_log "Ray head on $head at $RAY_ADDRESS; nodes: ${nodes[*]}; logs: $RPP_LOG_DIR"
  # shellcheck disable=SC2086  # RPP_RAY_HEAD_ARGS is a list of arguments
  rpp_start_node "$head" --head --port="$RPP_RAY_PORT" --node-ip-address="$RPP_HEAD_IP" $RPP_RAY_HEAD_ARGS $RPP_RAY_NODE_ARGS
  until (exec 3<>"/dev/tcp/$RPP_HEAD_IP/$RPP_RAY_PORT") 2>/dev/null; do
    if rpp_find_dead_ray_node; then
      rpp_log "error: the Ray head on $head exited (rc=$RPP_DEAD_RC) before listening; see $RPP_LOG_DIR/ray_$head.log"
      return 3
    fi
    if (( SECONDS - t0 > RPP_RAY_JOIN_TIMEOUT )); then
      rpp_log "error: the Ray head on $head is not listening on $RAY_ADDRESS after ${RPP_RAY_JOIN_TIMEOUT} s"; return 1
    fi
    sleep 0.5
  done
  for node in "${nodes[@]}"; do
    # shellcheck disable=SC2086
    if [ "$node" != "$head" ]; then RPP_JOIN=1 rpp_start_node "$node" $RPP_RAY_NODE_ARGS; fi
  done
  "$RPP_PYTHON" -m megatron_rpp.trainer.cluster wait --address "$RAY_ADDRESS" \
    --nodes "$(IFS=,; echo "${nodes[*]}")" --timeout $(( RPP_RAY_JOIN_TIMEOUT - (SECONDS - t0) )) &
  waiter=$!
  while kill -0 "$waiter" 2>/dev/null; do
    if rpp_find_dead_ray_node; then
      kill -TERM "$waiter" 2>/dev/null; wait "$waiter" 2>/dev/null
      node=$RPP_DEAD_NODE
      rpp_log "error: Ray on node $node exited (rc=$RPP_DEAD_RC) before the cluster was up; node $node never joined;" \
              "see $RPP_LOG_DIR/ray_$node.log"
      return 3
    fi
    sleep 0.5
  done
  wait "$waiter" || rc=$?
  if [ "$rc" != 0 ]; then
    # the join wait connects through this node's raylet: it can die with the head's Ray
    for _ in 1 2 3 4 5 6; do
      if rpp_find_dead_ray_node; then
        rpp_log "error: Ray on node $RPP_DEAD_NODE exited (rc=$RPP_DEAD_RC) before the cluster was up (join wait rc=$rc);" \
                "see $RPP_LOG_DIR/ray_$RPP_DEAD_NODE.log"
        return 3
      fi
      sleep 0.5
    done
    rpp_log "error: the Ray cluster did not come up (join wait rc=$rc)"
    return 1
  fi
  rpp_log "Ray cluster up in $(( SECONDS - t0 )) s"
  return 0
}

rpp_run_controller() {
  local node lost_at="" lost=""
  "$@" &
  RPP_CONTROLLER_PID=$!
  while kill -0 "$RPP_CONTROLLER_PID" 2>/dev/null; do
    if [ -z "$lost_at" ] && rpp_find_dead_ray_node; then
      lost=$RPP_DEAD_NODE; lost_at=$SECONDS
      node=$lost
      rpp_log "Ray on node $node exited (rc=$RPP_DEAD_RC) while the controller runs"
    fi
    if [ -n "$lost_at" ] && (( SECONDS - lost_at > RPP_NODE_LOSS_GRACE )); then
      rpp_log "error: the controller is still running ${RPP_NODE_LOSS_GRACE} s after node $lost was lost: stopping it"
      rpp_stop_controller; break
    fi
    sleep 1
  done
  wait "$RPP_CONTROLLER_PID"
}

rpp_stop_controller() {
  local p=$RPP_CONTROLLER_PID t0=$SECONDS
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null
  while kill -0 "$p" 2>/dev/null && (( SECONDS - t0 < RPP_CONTROLLER_STOP_TIMEOUT )); do sleep 0.5; done
  kill -0 "$p" 2>/dev/null && { rpp_log "controller did not stop: SIGKILL"; kill -KILL "$p" 2>/dev/null; }
  return 0
}

rpp_ray_down() {
  [ -n "${RPP_RAY_DOWN_DONE:-}" ] && return 0
  RPP_RAY_DOWN_DONE=1
  rpp_stop_controller
  rpp_stop_ray_steps
}

rpp_stop_ray_steps() {
  local p t0=$SECONDS alive
  [ "${#RPP_RAY_PIDS[@]}" = 0 ] && return 0
  rpp_log "stopping Ray on ${RPP_RAY_NODES[*]}"
  # a signalled srun ends its step: Slurm kills every process of it on that node
  for p in "${RPP_RAY_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  while (( SECONDS - t0 < RPP_RAY_STOP_TIMEOUT )); do
    alive=0; for p in "${RPP_RAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.5
  done
  for p in "${RPP_RAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  rpp_sweep_nodes
  rpp_log "Ray stopped in $(( SECONDS - t0 )) s"
  return 0
}

# Processes of this job's Ray steps that outlived their step: Slurm's proctrack/linuxproc
# (unlike proctrack/cgroup) loses a process whose parent died first, e.g. Ray's agents when
# their raylet was killed. Every Ray step's process carries RPP_RAY_STEP=<job id> in its
# environment (inherited by Ray's children); one step per node kills those, nothing else.
rpp_sweep_nodes() {
  local nodes
  nodes=$(printf '%s\n' "${RPP_RAY_NODES[@]}" | sort -u | paste -sd, -)
  [ -n "$nodes" ] || return 0
  # shellcheck disable=SC2016  # expanded on the node
  timeout "$RPP_RAY_STOP_TIMEOUT" srun --overlap --nodes="$(tr , '\n' <<<"$nodes" | wc -l)" --ntasks-per-node=1 \
      -w "$nodes" bash -c 'tag="RPP_RAY_STEP=$SLURM_JOB_ID"
      ours() { local e p; for e in /proc/[0-9]*/environ; do p=${e#/proc/}; p=${p%/environ}
                 grep -qzxF "$tag" "$e" 2>/dev/null && echo "$p"; done; }
      pids=$(ours); [ -n "$pids" ] || exit 0
      echo "[ray_cluster] node $SLURMD_NODENAME: stopping leftover Ray processes" $pids
      kill -TERM $pids 2>/dev/null; sleep 2; pids=$(ours); [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
      exit 0' || rpp_log "warning: the leftover sweep on $nodes did not finish"
}

rpp_on_signal() {
  rpp_log "got SIG$1: stopping the controller and Ray"
  rpp_stop_controller
  rpp_ray_down
  if [ "$1" = USR1 ]; then  # the time-limit warning of --signal=B:USR1@SECONDS: continue in a new allocation
    rpp_log "requeueing job ${SLURM_JOB_ID}: it continues from its newest checkpoint (trainer.resume=auto)"
    scontrol requeue "$SLURM_JOB_ID" || rpp_log "error: scontrol requeue $SLURM_JOB_ID failed"
  fi
  exit 143
}
