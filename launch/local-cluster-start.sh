#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (no systemd needed), idempotently.
#
#   local-cluster-start.sh STATE_DIR
#
# Env knobs (all optional):
#   SLURM_CPUS       CPUs to declare for the node (default: nproc). More than the
#                    real count works thanks to SlurmdParameters=config_overrides.
#   SLURM_MEM_MB     RealMemory to declare (default 1000).
#   SLURM_MIN_JOB_AGE  seconds a finished job stays visible to squeue/scontrol (default 3600).
#   SLURMCTLD_PORT / SLURMD_PORT   (default 6817 / 6818)
#   START_TIMEOUT    seconds to wait for the node to become idle (default 60).
#   SLURM_KILL_INVALID_DEPEND=1  cancel a job at once when its afterok dependency fails
#                    (default 0, Slurm's own default, as on most clusters: the job stays
#                    pending for ever with reason DependencyNeverSatisfied).
#   SLURM_FRESH=1    wipe saved controller/slurmd state (job records) before starting.
#                    Otherwise jobs that were running when the daemons died get
#                    requeued and rerun on the next start.
#
# Requires root and the Debian packages: slurmctld slurmd slurm-client munge.
# On success prints the line to eval:  export SLURM_CONF=STATE_DIR/slurm.conf
set -euo pipefail

STATE=${1:?usage: $0 STATE_DIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
CONF=$STATE/slurm.conf
HOST=$(hostname -s)
CPUS=${SLURM_CPUS:-$(nproc)}
MEM=${SLURM_MEM_MB:-1000}
MINAGE=${SLURM_MIN_JOB_AGE:-3600}
CPORT=${SLURMCTLD_PORT:-6817}
DPORT=${SLURMD_PORT:-6818}
TIMEOUT=${START_TIMEOUT:-60}
DEPENDENCY_LINE="# afterok on a failed job: the dependent job stays pending (Slurm's default)"
if [ "${SLURM_KILL_INVALID_DEPEND:-0}" = 1 ]; then
  DEPENDENCY_LINE="DependencyParameters=kill_invalid_depend"
fi
export SLURM_CONF=$CONF

log() { echo "[start_cluster] $*" >&2; }
die() { log "ERROR: $*"; for f in "$STATE"/log/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -n 30 "$f" >&2; }; done; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "must run as root"
for b in munged munge unmunge slurmctld slurmd sinfo scontrol; do
  command -v "$b" >/dev/null || die "missing $b (apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)"
done

# ---------- munge ----------
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
  log "creating munge key"
  mkdir -p /etc/munge
  mungekey --create --keyfile="$KEY" 2>/dev/null || dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge "$KEY"; chmod 0700 /etc/munge; chmod 0600 "$KEY"
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  log "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
  touch "$STATE/.munged_started_here"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munge not working"
fi

# ---------- slurm.conf ----------
mkdir -p "$STATE"/{ctld,spool,log}
if alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; then
  log "daemons already running for $STATE; keeping existing slurm.conf"
else
  if [ "${SLURM_FRESH:-0}" = 1 ]; then
    log "wiping saved state"; rm -rf "$STATE"/ctld "$STATE"/spool; mkdir -p "$STATE"/{ctld,spool}
  fi
  cat > "$CONF" <<EOF
# one-node localhost cluster, written by local-cluster-start.sh
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$CPORT
SlurmdPort=$DPORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups / systemd in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# allow declaring more CPUs/memory than the machine has
SlurmdParameters=config_overrides
# schedule on submit instead of batching for 3 s (default batch_sched_delay=3)
SchedulerParameters=batch_sched_delay=0
$DEPENDENCY_LINE
# keep finished jobs visible to squeue -t all / scontrol show job (default 300 s)
MinJobAge=$MINAGE
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
fi

# ---------- daemons ----------
if ! alive "$STATE/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -f "$CONF" || die "slurmctld failed to start"
fi
D_SINCE=""
if ! alive "$STATE/slurmd.pid"; then
  log "starting slurmd"
  D_SINCE=$(date +%Y-%m-%dT%H:%M:%S)
  slurmd -f "$CONF" || die "slurmd failed to start"
fi

# ---------- wait for idle ----------
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  st=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  # a restarted slurmctld may report the node idle from saved state before the new
  # slurmd has registered: also require SlurmdStartTime >= when we launched slurmd
  reg=ok
  if [ -n "$D_SINCE" ]; then
    sst=$(scontrol show node "$HOST" 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2)
    [[ "$sst" > "$D_SINCE" || "$sst" == "$D_SINCE" ]] || reg=no
  fi
  case "$st" in
    idle|mix|alloc) [ $reg = ok ] && break ;;
    down*|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || die "node not idle after ${TIMEOUT}s (state='$st')"
  sleep 0.2
done
log "cluster up: node $HOST is $st"
echo "export SLURM_CONF=$CONF"
