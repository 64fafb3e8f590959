#!/usr/bin/env bash
# N local processes of `clipjax train`, K simulated CPU devices each, as one multi-host job.
#
#   launch/local.sh [-d K] [-t SECONDS] N [clipjax train arguments...]
#   launch/local.sh 2 --workdir /tmp/mh total_steps=20 optimizer.warmup_steps=2
#
# Every rank runs on this machine's CPU (JAX_PLATFORMS=cpu) with gloo collectives over
# loopback, coordinated by rank 0 on 127.0.0.1 at a free port: the same program a pod
# runs, small enough to debug on a laptop. The losses equal those of one process with
# N x K devices (tests/test_multihost.py checks it).
#
#   -d K        simulated CPU devices per process (default $CLIPJAX_LOCAL_DEVICES or 4)
#   -t SECONDS  kill every rank after this long, exit 124 (default $CLIPJAX_LAUNCH_TIMEOUT,
#               0: no limit)
#   CLIPJAX     the command that runs clipjax (default `clipjax`; e.g. "python -m clipjax.cli")
#   CLIPJAX_LAUNCH_LOGS  where ranks >= 1 write rank<i>.log (default: a new temporary folder)
#
# Rank 0 prints to this terminal; the others write their logs, whose last lines are shown
# when a rank fails. If any rank fails, time runs out, or the launcher is interrupted,
# every rank is killed and the launcher exits non-zero (the failing rank's status).
set -euo pipefail

devices=${CLIPJAX_LOCAL_DEVICES:-4}
timeout=${CLIPJAX_LAUNCH_TIMEOUT:-0}
while getopts "d:t:h" opt; do
  case $opt in
    d) devices=$OPTARG ;;
    t) timeout=$OPTARG ;;
    h) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [-d K] [-t SECONDS] N [clipjax train arguments...]" >&2
  exit 2
fi
nproc=$1
shift

read -ra clipjax <<< "${CLIPJAX:-clipjax}"
python=${PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
logs=${CLIPJAX_LAUNCH_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/clipjax-launch.XXXXXX")}
mkdir -p "$logs"

# Keep every other XLA flag (the tests' optimisation level, say); replace the device count.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")
export XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
unset CLIPJAX_COORDINATOR CLIPJAX_NUM_PROCESSES CLIPJAX_PROCESS_ID CLIPJAX_LOCAL_DEVICE_IDS

pids=()
alive() {  # the pids among $@ still running
  local pid
  for pid in "$@"; do
    if kill -0 "$pid" 2> /dev/null; then echo "$pid"; fi
  done
}
kill_all() {  # SIGTERM (clipjax stops cleanly), then SIGKILL after 5 s
  local left
  mapfile -t left < <(alive "${pids[@]}")
  if [[ ${#left[@]} -eq 0 ]]; then return 0; fi
  kill -TERM "${left[@]}" 2> /dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    sleep 0.5
    mapfile -t left < <(alive "${left[@]}")
    if [[ ${#left[@]} -eq 0 ]]; then return 0; fi
  done
  kill -KILL "${left[@]}" 2> /dev/null || true
}
trap 'kill_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "launch/local.sh: $nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
     "logs of ranks 1..$((nproc - 1)) in $logs" >&2
declare -A rank_of
for ((i = 0; i < nproc; i++)); do
  # All four given: jax.distributed skips cluster auto-detection (SLURM, Kubernetes) here.
  cmd=("${clipjax[@]}" train --coordinator "127.0.0.1:$port" --num-processes "$nproc"
       --process-id "$i" --local-device-ids "$(seq -s, 0 $((devices - 1)))" "$@")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$logs/rank$i.log" 2>&1 &
  fi
  pids+=($!)
  rank_of[$!]=$i
done

if [[ $timeout != 0 ]]; then
  sleep "$timeout" &
  pids+=($!)
  rank_of[$!]=timeout
fi

# Wait for each rank; the first failure (or the watchdog) ends the job.
remaining=$nproc
while [[ $remaining -gt 0 ]]; do
  status=0
  wait -n -p done_pid || status=$?
  who=${rank_of[$done_pid]}
  if [[ $who == timeout ]]; then
    echo "launch/local.sh: no result after ${timeout}s; killing every rank." >&2
    exit 124
  fi
  remaining=$((remaining - 1))
  if [[ $status -ne 0 ]]; then
    echo "launch/local.sh: rank $who exited with status $status; killing every rank." >&2
    if [[ $who -ne 0 ]]; then
      tail -n 30 "$logs/rank$who.log" | sed "s/^/[rank $who] /" >&2 || true
    fi
    exit "$status"
  fi
done
exit 0  # the EXIT trap ends the watchdog
