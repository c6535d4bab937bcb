#!/usr/bin/env bash
# A Slurm rehearsal cluster on this one machine (root), so the job templates run unchanged as on
# a GPU cluster: one slurmctld, and per node its own slurmd in its own UTS namespace (its own
# hostname, which /etc/hosts resolves), all reached on 127.0.0.1 at their own ports. Idempotent;
# daemons tracked by PID.
#
#   tools/slurm_local.sh up [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
#   tools/slurm_local.sh status     daemons and node states; exit 0 only when every node is usable
#   tools/slurm_local.sh down       stop the daemons (config and packages stay)
#
# Partitions:
#   rehearsal (default)  node[1-N] (default 4 nodes): G stand-in GPUs each (default 4) as
#                        gres/gpu on device nodes under /var/lib/chexnet-slurm/dev, so Slurm's GPU
#                        bookkeeping and CUDA_VISIBLE_DEVICES per task are real; C CPUs each
#                        (default 32, more than exist: slurmd's config_overrides), so tasks are
#                        not bound (CpuBind=none)
#   cores                cores1: this machine's real cores, tasks bound to them (task/affinity)
# up installs slurm-wlm and munge when missing. It writes /etc/slurm/slurm.conf unless a config
# is there that this script did not write (then it stops and changes nothing); a different
# layout restarts the daemons.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by chexnet_hvd tools/slurm_local.sh"
STATE=/var/lib/chexnet-slurm
LOGS=/var/log/chexnet-slurm
PIDS=/run/chexnet-slurm
BASE_PORT=17000

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged unshare; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if (( ${#missing[@]} )); then
    echo "slurm_local: installing slurm-wlm and munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge util-linux >/dev/null
  fi
}

# The nodes of the layout, one "name port cpus gpus cpubind" line each.
nodes() {
  echo "cores1 $BASE_PORT $(nproc) 0 cores"
  for i in $(seq "$NODES"); do echo "node$i $((BASE_PORT + i)) $CPUS $GPUS none"; done
}

slurm_conf() {
  local mem
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
  cat <<EOF
$MARK
ClusterName=chexnet-rehearsal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
EOF
  local name port cpus gpus bind
  while read -r name port cpus gpus bind; do
    echo "NodeName=$name NodeAddr=127.0.0.1 Port=$port CPUs=$cpus Sockets=1 CoresPerSocket=$cpus" \
         "ThreadsPerCore=1 RealMemory=$mem CpuBind=$bind$( ((gpus)) && echo " Gres=gpu:$gpus") State=UNKNOWN"
  done < <(nodes)
  echo "PartitionName=rehearsal Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  echo "PartitionName=cores Nodes=cores1 MaxTime=INFINITE State=UP"
}

gres_conf() {
  local name port cpus gpus bind
  while read -r name port cpus gpus bind; do
    ((gpus)) && echo "NodeName=$name Name=gpu File=$STATE/dev/$name/nvidia[0-$((gpus - 1))]"
  done < <(nodes)
  return 0
}

# Everything a node's slurmd reads, in its own folder: the same slurm.conf and gres.conf, and an
# mpi.conf giving its PMIx clients their own tmpdir (two slurmds sharing one collide on it).
write_config() {
  if [[ -f $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
    die "$CONF: exists and was not written by this script; not touching it"
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$LOGS" "$PIDS"
  local new changed=1
  new="$(slurm_conf)"
  [[ -f $CONF && "$(cat "$CONF")" == "$new" ]] && changed=0
  printf '%s\n' "$new" > "$CONF"
  gres_conf > /etc/slurm/gres.conf
  local name port cpus gpus bind
  while read -r name port cpus gpus bind; do
    mkdir -p "$STATE/etc/$name" "$STATE/d/$name" "$STATE/pmix/$name" "$STATE/dev/$name"
    cp "$CONF" /etc/slurm/gres.conf "$STATE/etc/$name/"
    echo "PMIxCliTmpDirBase=$STATE/pmix/$name" > "$STATE/etc/$name/mpi.conf"
    for ((g = 0; g < gpus; g++)); do  # stand-in device nodes (major 195, as NVIDIA's)
      [[ -e $STATE/dev/$name/nvidia$g ]] || mknod "$STATE/dev/$name/nvidia$g" c 195 "$g"
    done
  done < <(nodes)
  echo "$changed"
}

# The node names resolve, to 127.0.0.1, as a cluster's do (the tf engine's workers reach each
# other by the host names Slurm gives them). /etc/hosts is rewritten in place: it may be a mount.
write_hosts() {
  local line names kept
  names="$(nodes | awk '{print $1}' | paste -sd' ')"
  line="127.0.0.1 $names  $MARK"
  kept="$(grep -vF "$MARK" /etc/hosts || true)"
  [[ "$(grep -F "$MARK" /etc/hosts || true)" == "$line" ]] || printf '%s\n%s\n' "$kept" "$line" > /etc/hosts
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_node() {  # its own hostname (UTS namespace); slurmd daemonizes inside it
  local name=$1
  unshare --uts -- sh -c "hostname $name && exec slurmd -f $STATE/etc/$name/slurm.conf -N $name"
}

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

up() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (starts slurmctld, slurmd and munged)"
  install_packages
  local changed
  changed="$(write_config)"
  write_hosts
  if ((changed)) && pgrep -x slurmctld >/dev/null; then
    echo "slurm_local: layout changed; restarting the daemons"
    down >/dev/null
  fi
  pgrep -x munged >/dev/null || { mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
                                  runuser -u munge -- munged 2>/dev/null || munged --force; }
  alive "$PIDS/slurmctld.pid" || slurmctld
  local name port cpus gpus bind
  while read -r name port cpus gpus bind; do
    alive "$PIDS/slurmd-$name.pid" || start_node "$name"
  done < <(nodes)
  local want=$((NODES + 1))
  for _ in $(seq 90); do
    local states ready
    states="$(node_states)"
    ready="$(grep -cE ' (idle|mixed|allocated)' <<<"$states" || true)"
    if ((ready == want)); then
      echo "slurm_local: up: node[1-$NODES] ($CPUS CPUs, $GPUS GPUs each) and cores1 ($(nproc) cores)"
      return 0
    fi
    for name in $(awk '$2 ~ /^(down|drain)/ {print $1}' <<<"$states"); do
      scontrol update nodename="$name" state=resume 2>/dev/null || true
    done
    sleep 1
  done
  die "slurm did not come up within 90 s ($(node_states | paste -sd' ')); see $LOGS/"
}

status() {
  local ok=0 f
  alive "$PIDS/slurmctld.pid" && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
  for f in "$PIDS"/slurmd-*.pid; do
    [[ -e $f ]] || continue
    local n=${f##*/slurmd-}; n=${n%.pid}
    alive "$f" && echo "slurmd $n: running" || { echo "slurmd $n: stopped"; ok=1; }
  done
  local states
  states="$(node_states || true)"
  echo "${states:-no nodes}"
  grep -qvE ' (idle|mixed|allocated|completing)' <<<"$states" && ok=1
  [[ -n $states ]] || ok=1
  return $ok
}

down() {
  local f pids=()
  for f in "$PIDS"/slurmd-*.pid "$PIDS"/slurmctld.pid; do
    alive "$f" && pids+=("$(cat "$f")")
  done
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 30); do  # they save state first; `up` right after must not find them running
    local left=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    ((left)) || { rm -f "$PIDS"/*.pid; echo "slurm_local: stopped ${#pids[@]} daemons"; return 0; }
    sleep 1
  done
  die "slurm daemons still running 30 s after SIGTERM: ${pids[*]}"
}

NODES=4 GPUS=4 CPUS=32
cmd=${1:-}; shift || true
while (($#)); do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    --cpus-per-node) CPUS=$2; shift 2 ;;
    *) die "$1: unknown option (see --help)" ;;
  esac
done
[[ $NODES =~ ^[1-9][0-9]*$ && $GPUS =~ ^[0-9]+$ && $CPUS =~ ^[1-9][0-9]*$ ]] \
  || die "--nodes, --gpus-per-node and --cpus-per-node take whole numbers (nodes, CPUs >= 1)"
case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
