#!/usr/bin/env bash
# A real single-node Slurm on this machine (slurmctld + slurmd + munge, as root) for tests and
# demos of the job templates. Idempotent.
#
#   tools/slurm_local.sh up       install slurm-wlm + munge if missing, write the config, start
#   tools/slurm_local.sh status   daemons and node state; exit 0 only when the node is usable
#   tools/slurm_local.sh down     stop the daemons (the config and packages stay)
#
# The config goes to /etc/slurm/slurm.conf unless one is there that this script did not write
# (then it stops with an error and changes nothing). MpiDefault=pmix, so `srun` starts Open MPI
# (and so Horovod) ranks as on a real cluster; CR_Core with proctrack/linuxproc and task/none,
# so no cgroups are needed.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by chexnet_hvd tools/slurm_local.sh"
STATE=/var/lib/chexnet-slurm
LOGS=/var/log/chexnet-slurm

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if (( ${#missing[@]} )); then
    echo "slurm_local: installing slurm-wlm and munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
    die "$CONF: exists and was not written by this script; not touching it"
  fi
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
  cat > "$CONF" <<EOF
$MARK
ClusterName=chexnet-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/chexnet-slurmctld.pid
SlurmdPidFile=/run/chexnet-slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

running() { pgrep -x "$1" >/dev/null; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

up() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (starts slurmctld, slurmd and munged)"
  install_packages
  write_conf
  running munged || { mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
                      runuser -u munge -- munged 2>/dev/null || munged --force; }
  running slurmctld || slurmctld
  running slurmd || slurmd
  for _ in $(seq 60); do
    case "$(node_state)" in
      idle*|mixed*|allocated*) echo "slurm_local: up ($(hostname -s), $(nproc) CPUs)"; return 0 ;;
      down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "slurm did not come up within 60 s; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

status() {
  local ok=0
  for d in munged slurmctld slurmd; do
    if running "$d"; then echo "$d: running"; else echo "$d: stopped"; ok=1; fi
  done
  echo "node: $(node_state || true)"
  case "$(node_state)" in idle*|mixed*|allocated*) ;; *) ok=1 ;; esac
  return $ok
}

down() {
  for d in slurmd slurmctld; do
    pkill -x "$d" 2>/dev/null || true
  done
  for _ in $(seq 30); do  # they save state first; `up` right after must not find them running
    running slurmd || running slurmctld || { echo "slurm_local: stopped slurmd and slurmctld"; return 0; }
    sleep 1
  done
  die "slurmd/slurmctld still running 30 s after SIGTERM"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
