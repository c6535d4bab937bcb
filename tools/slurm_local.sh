#!/usr/bin/env bash
# A Slurm rehearsal cluster on this one machine (root), so the job templates run unchanged as on
# a GPU cluster: one slurmctld, and per node its own slurmd in its own network namespace (its own
# address on a private bridge) and its own UTS namespace (its own hostname, which /etc/hosts
# resolves to that address). Links between nodes can be slowed or cut. Idempotent; daemons
# tracked by PID.
#
#   tools/slurm_local.sh up [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
#                                   also restores every link (unshaped, up)
#   tools/slurm_local.sh status     daemons, node states and links; exit 0 only when every node
#                                   is usable
#   tools/slurm_local.sh down       stop the daemons, remove the network (config and packages stay)
#   tools/slurm_local.sh link NODE rate RATE   shape NODE's link to RATE (e.g. 200mbit, 1gbit)
#                                   in both directions (tc tbf; bandwidth only: this kernel has no
#                                   netem, so no added delay)
#   tools/slurm_local.sh link NODE rate unlimited   remove the shaping
#   tools/slurm_local.sh link NODE down|up          cut / restore NODE's link (its packets are
#                                   dropped, as with a pulled cable: connections stall, no reset)
#
# Partitions:
#   rehearsal (default)  node[1-N] (default 4 nodes): G stand-in GPUs each (default 4) as
#                        gres/gpu on device nodes under /var/lib/chexnet-slurm/dev, so Slurm's GPU
#                        bookkeeping and CUDA_VISIBLE_DEVICES per task are real; C CPUs each
#                        (default 32, more than exist: slurmd's config_overrides), so tasks are
#                        not bound (CpuBind=none)
#   cores                cores1: this machine's real cores, tasks bound to them (task/affinity)
# Network: 10.231.0.0/24 (a private subnet, refused if anything else here uses it) on a bridge
# inside the namespace chx-bridge; this machine (where sbatch, srun and slurmctld run) is
# 10.231.0.1 on its interface chx0, cores1 10.231.0.10, nodeI 10.231.0.(10+I); each node's
# namespace (named as the node: `ip netns exec node2 CMD`) has lo and eth0 and no route beyond
# the subnet, so its processes reach only loopback and the other test hosts.
# up installs slurm-wlm and munge when missing. It writes /etc/slurm/slurm.conf unless a config
# is there that this script did not write (then it stops and changes nothing); a different
# layout restarts the daemons.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by chexnet_hvd tools/slurm_local.sh"
STATE=/var/lib/chexnet-slurm
LOGS=/var/log/chexnet-slurm
PIDS=/run/chexnet-slurm
SUBNET=10.231.0          # .0/24
SUBMIT_ADDR=$SUBNET.1    # this machine's side of the bridge: slurmctld, sbatch, srun
SUBMIT_IF=chx0
BRIDGE_NS=chx-bridge     # the "switch": a bridge and one veth end per node, in a namespace of ours

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged unshare ip tc; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if (( ${#missing[@]} )); then
    echo "slurm_local: installing slurm-wlm, munge and iproute2 (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge util-linux iproute2 >/dev/null
  fi
}

# The nodes of the layout, one "name cpus gpus cpubind address" line each.
nodes() {
  echo "cores1 $(nproc) 0 cores $SUBNET.10"
  for i in $(seq "$NODES"); do echo "node$i $CPUS $GPUS none $SUBNET.$((10 + i))"; done
}

slurm_conf() {
  local mem
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
  cat <<EOF
$MARK
ClusterName=chexnet-rehearsal
SlurmctldHost=$(hostname -s)($SUBMIT_ADDR)
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
  local name cpus gpus bind addr
  while read -r name cpus gpus bind addr; do
    echo "NodeName=$name NodeAddr=$addr CPUs=$cpus Sockets=1 CoresPerSocket=$cpus" \
         "ThreadsPerCore=1 RealMemory=$mem CpuBind=$bind$( ((gpus)) && echo " Gres=gpu:$gpus") State=UNKNOWN"
  done < <(nodes)
  echo "PartitionName=rehearsal Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  echo "PartitionName=cores Nodes=cores1 MaxTime=INFINITE State=UP"
}

gres_conf() {
  local name cpus gpus bind addr
  while read -r name cpus gpus bind addr; do
    ((gpus)) && echo "NodeName=$name Name=gpu File=$STATE/dev/$name/nvidia[0-$((gpus - 1))]"
  done < <(nodes)
  return 0
}

# Everything a node's slurmd reads, in its own folder: the same slurm.conf and gres.conf, and an
# mpi.conf giving its PMIx clients their own tmpdir (two slurmds sharing one collide on it) and
# the ring algorithm for every PMIx fence. Slurm's default ("mixed": ring for the fence that
# exchanges data, tree for the barrier without data) let a rank leave MPI_Init and send to a rank
# still in its first fence, which Open MPI 4.1 does not survive (a SIGSEGV in MPI_Init): about 1
# launch in 8 of 16 ranks failed; with ring only, none (tools/mpi_start_check.sh has the numbers).
mpi_conf() { printf 'PMIxCliTmpDirBase=%s\nPMIxCollFence=ring\n' "$STATE/pmix/$1"; }

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
  local name cpus gpus bind addr
  while read -r name cpus gpus bind addr; do
    mkdir -p "$STATE/etc/$name" "$STATE/d/$name" "$STATE/pmix/$name" "$STATE/dev/$name"
    cp "$CONF" /etc/slurm/gres.conf "$STATE/etc/$name/"
    [[ "$(cat "$STATE/etc/$name/mpi.conf" 2>/dev/null)" == "$(mpi_conf "$name")" ]] || changed=1
    mpi_conf "$name" > "$STATE/etc/$name/mpi.conf"
    for ((g = 0; g < gpus; g++)); do  # stand-in device nodes (major 195, as NVIDIA's)
      [[ -e $STATE/dev/$name/nvidia$g ]] || mknod "$STATE/dev/$name/nvidia$g" c 195 "$g"
    done
  done < <(nodes)
  echo "$changed"
}

# Each node name resolves to its own address, as a cluster's do (the tf engine's workers and
# Open MPI reach each other by the host names Slurm gives them). /etc/hosts is rewritten in
# place: it may be a mount.
write_hosts() {
  local lines kept
  lines="$(nodes | awk -v mark="$MARK" '{print $5 " " $1 "  " mark}')"
  kept="$(grep -vF "$MARK" /etc/hosts || true)"
  [[ "$(grep -F "$MARK" /etc/hosts || true)" == "$lines" ]] || printf '%s\n%s\n' "$kept" "$lines" > /etc/hosts
}

# --- the network -------------------------------------------------------------------------------
# A switch and one cable per node: a bridge in its own namespace, a veth pair per node (eth0 in
# the node's namespace, to-NODE on the bridge) and one for this machine (chx0). Shaping and cuts
# act on these veths, so they hit exactly one node's traffic, both ways.

has_ns() { [[ -e /run/netns/$1 ]]; }
# nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, which slurmd needs.
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

# Only our own addresses: anything else on this subnet means it is not ours to use.
check_subnet() {
  local foreign
  foreign="$(ip -4 -o addr show | awk -v net="$SUBNET." -v mine="$SUBMIT_IF" \
             '$2 != mine && index($4, net) == 1 {print $2 " " $4}')"
  [[ -z $foreign ]] || die "$SUBNET.0/24: already used on this machine ($foreign); not touching it"
}

# One veth pair: $3 in namespace $2 (empty: this one), to-$1 on the bridge.
cable() {
  local name=$1 ns=$2 dev=$3
  ip ${ns:+-n "$ns"} link add "$dev" type veth peer name "to-$name" netns "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link set "to-$name" master br0 up
}

net_up() {
  check_subnet
  has_ns "$BRIDGE_NS" || ip netns add "$BRIDGE_NS"
  # No IPv6 on our links: nothing here uses it, and it would chatter (DAD, router solicitations).
  in_ns "$BRIDGE_NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$BRIDGE_NS" link show br0 >/dev/null 2>&1 || ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  if ! ip link show "$SUBMIT_IF" >/dev/null 2>&1; then
    cable submit "" "$SUBMIT_IF"
    sysctl -qw "net.ipv6.conf.$SUBMIT_IF.disable_ipv6=1"
  fi
  ip addr replace "$SUBMIT_ADDR/24" dev "$SUBMIT_IF"
  ip link set "$SUBMIT_IF" up
  local name cpus gpus bind addr
  while read -r name cpus gpus bind addr; do
    has_ns "$name" || ip netns add "$name"
    in_ns "$name" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$name" link set lo up
    ip -n "$name" link show eth0 >/dev/null 2>&1 || cable "$name" "$name" eth0
    ip -n "$name" addr replace "$addr/24" dev eth0
    ip -n "$name" link set eth0 up
    link_rate "$name" unlimited
    link_state "$name" up
  done < <(nodes)
}

net_down() {
  ip link del "$SUBMIT_IF" 2>/dev/null || true
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep -xE "node[0-9]+|cores1|$BRIDGE_NS" || true); do
    ip netns del "$ns"
  done
}

# A node's two veth ends, "namespace device" per line: its eth0 (egress: what it sends) and the
# bridge's to-NODE (egress: what it receives).
ends() { printf '%s eth0\n%s to-%s\n' "$1" "$BRIDGE_NS" "$1"; }

link_rate() {
  local node=$1 rate=$2 ns dev
  while read -r ns dev; do
    if [[ $rate == unlimited ]]; then
      tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    else
      tc -n "$ns" qdisc replace dev "$dev" root tbf rate "$rate" burst "$(burst_bytes "$rate")" latency 100ms
    fi
  done < <(ends "$node")
}

# tbf's bucket: 4 ms at the rate (at least 16 kB): enough for the kernel's timers, small enough
# that a few MB measure the rate, not the bucket.
burst_bytes() {
  local n=${1%%[a-z]*} unit=${1##*[0-9]} bits=0
  case $unit in kbit) bits=$((n * 1000)) ;; mbit) bits=$((n * 1000000)) ;; gbit) bits=$((n * 1000000000)) ;; esac
  local bytes=$((bits / 8 / 250))
  echo $((bytes > 16384 ? bytes : 16384))
}

link_state() { ip -n "$BRIDGE_NS" link set "to-$1" "$2"; }

link() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (changes the rehearsal network)"
  local node=${1:-} what=${2:-} rate=${3:-}
  [[ -n $node ]] || die "link: name a node (link NODE rate RATE|unlimited, link NODE down|up)"
  ip -n "$BRIDGE_NS" link show "to-$node" >/dev/null 2>&1 || die "$node: no such rehearsal node (is the cluster up?)"
  case "$what" in
    rate) [[ $rate == unlimited || $rate =~ ^[1-9][0-9]*(kbit|mbit|gbit)$ ]] \
            || die "link $node rate: '$rate' is not a rate like 200mbit, 1gbit or unlimited"
          link_rate "$node" "$rate" ;;
    up|down) link_state "$node" "$what" ;;
    *) die "link $node: '$what' is not rate, up or down" ;;
  esac
}

# "NODE ADDRESS up|down RATE" per node, read from the kernel.
links() {
  local name cpus gpus bind addr state rate
  while read -r name cpus gpus bind addr; do
    has_ns "$name" || { echo "$name $addr missing"; continue; }
    state=down
    ip -n "$BRIDGE_NS" -o link show "to-$name" 2>/dev/null | grep -q '[<,]UP[,>]' && state=up
    rate="$(tc -n "$name" qdisc show dev eth0 | grep -o 'rate [^ ]*' | cut -d' ' -f2 || true)"
    echo "$name $addr $state ${rate:-unlimited}"
  done < <(nodes)
}

# --- the daemons -------------------------------------------------------------------------------

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_node() {  # its own network and hostname (UTS namespace); slurmd daemonizes inside them
  local name=$1
  in_ns "$name" unshare --uts -- sh -c "hostname $name && exec slurmd -f $STATE/etc/$name/slurm.conf -N $name" </dev/null
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
  net_up
  pgrep -x munged >/dev/null || { mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
                                  runuser -u munge -- munged 2>/dev/null || munged --force; }
  alive "$PIDS/slurmctld.pid" || slurmctld
  local name cpus gpus bind addr
  while read -r name cpus gpus bind addr; do
    alive "$PIDS/slurmd-$name.pid" || start_node "$name"
  done < <(nodes)
  local want=$((NODES + 1))
  for _ in $(seq 90); do
    local states ready
    states="$(node_states)"
    ready="$(grep -cE ' (idle|mixed|allocated)' <<<"$states" || true)"
    if ((ready == want)); then
      echo "slurm_local: up: node[1-$NODES] ($CPUS CPUs, $GPUS GPUs each) and cores1 ($(nproc) cores)" \
           "on $SUBNET.0/24, slurmctld at $SUBMIT_ADDR"
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
  if has_ns "$BRIDGE_NS"; then
    echo "links (node address state rate):"
    links | sed 's/^/  /'
  else
    echo "network: not set up"; ok=1
  fi
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
    if ! ((left)); then
      rm -f "$PIDS"/*.pid
      net_down
      echo "slurm_local: stopped ${#pids[@]} daemons; network removed"
      return 0
    fi
    sleep 1
  done
  die "slurm daemons still running 30 s after SIGTERM: ${pids[*]}"
}

NODES=4 GPUS=4 CPUS=32
cmd=${1:-}; shift || true
if [[ $cmd == link ]]; then link "$@"; exit; fi
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
((NODES <= 200)) || die "--nodes: at most 200 (one /24 of addresses)"
case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
