#!/usr/bin/env bash
# Stop the cluster started by local-cluster-start.sh STATE_DIR.
#   local-cluster-stop.sh STATE_DIR [--keep-munge]
# Cancels all jobs, stops slurmd + slurmctld, and stops munged if local-cluster-start.sh
# started it (unless --keep-munge). Safe to run when nothing is running.
set -uo pipefail

STATE=${1:?usage: $0 STATE_DIR [--keep-munge]}
KEEP_MUNGE=${2:-}
STATE=$(cd "$STATE" 2>/dev/null && pwd) || { echo "[stop_cluster] no such dir $1" >&2; exit 0; }
export SLURM_CONF=$STATE/slurm.conf
log() { echo "[stop_cluster] $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/slurmctld.pid"; then
  ids=$(squeue -h -o %A 2>/dev/null || true)
  [ -n "$ids" ] && { log "cancelling jobs"; scancel $ids 2>/dev/null || true; sleep 1; }
fi

for d in slurmd slurmctld; do
  pf=$STATE/$d.pid
  if alive "$pf"; then
    pid=$(cat "$pf"); log "stopping $d (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$d did not exit, SIGKILL"; kill -KILL "$pid" 2>/dev/null; }
  fi
  rm -f "$pf"
done

tree() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do tree "$c"; done; echo "$1"; }
# job steps left behind (slurmstepd survives slurmd; its cwd is our log dir)
for p in $(pgrep -x slurmstepd 2>/dev/null); do
  case "$(readlink /proc/$p/cwd 2>/dev/null)" in
    "$STATE"/*) log "killing leftover slurmstepd $p and its children"
                kill -KILL $(tree "$p") 2>/dev/null ;;
  esac
done

if [ "$KEEP_MUNGE" != --keep-munge ] && [ -f "$STATE/.munged_started_here" ]; then
  log "stopping munged"
  munged --stop >/dev/null 2>&1 || { [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null; }
  rm -f "$STATE/.munged_started_here"
fi
log "stopped"
