#!/usr/bin/env bash
# A real Slurm cluster on this one host, for the launch tests (tests/e2e/test_slurm.py) and for
# trying slurm/ by hand: munge, slurmctld and two emulated slurmd nodes (n1, n2), plus OpenMPI
# with PMIx. Debian/Ubuntu, as root, without systemd. Idempotent: packages are installed once,
# running daemons are left alone when the cluster already answers with this config, otherwise
# restarted.
#   bash scripts/slurm_local.sh          # bring up (or check) the cluster
#   bash scripts/slurm_local.sh stop     # stop the daemons it started
# Knobs: SLURM_EMU_NODES (2), SLURM_NODE_CPUS (4; may exceed the cores: config_overrides).
set -euo pipefail
NNODES=${SLURM_EMU_NODES:-2}
CPUS=${SLURM_NODE_CPUS:-4}
CONF=/etc/slurm/slurm.conf
PACKAGES="slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev"

stop() {
  local f p
  for f in /run/slurm/slurmd-*.pid /run/slurm/slurmctld.pid; do
    [ -s "$f" ] || continue
    p=$(cat "$f"); kill "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    rm -f "$f"
  done
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh: needs root (apt-get, daemons)" >&2; exit 1; }
T0=$(date +%s.%N)

# 1. packages (policy-rc.d / no systemd: their postinst starts no daemon)
missing=0
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
fi

# 2. munge: a key, its run directories, the daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# 3. slurm.conf. Requeue latency: a requeued job waits cred_expire seconds before it may start
# again (120 by default; 10 is still ample for a step launch on this host), the scheduler runs
# every second and on every event (no batch delay), and a finished job leaves the node after
# KillWait.
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 8 / 10 / NNODES ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm /run/slurm
NEW=$(mktemp)
cat > "$NEW" <<EOF
# written by megamoe scripts/slurm_local.sh
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1,default_queue_depth=20
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=2
Waittime=0
EOF
NAMES=()
for i in $(seq 1 "$NNODES"); do
  NAMES+=("n$i")
  echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i))" \
       "CPUs=$CPUS RealMemory=$MEM State=UNKNOWN" >> "$NEW"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$NEW"
# the emulated node names must resolve (MASTER_ADDR is the first of them)
grep -q '# slurm-emu' /etc/hosts || echo "127.0.0.1 ${NAMES[*]} # slurm-emu" >> /etc/hosts

up() { [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)')" -eq "$NNODES" ]; }
if cmp -s "$NEW" "$CONF" && up; then
  rm -f "$NEW"
  echo "slurm_local: cluster already up ($(sinfo -h -N -o %N | tr '\n' ' '))"
  exit 0
fi
mv "$NEW" "$CONF"; chmod 0644 "$CONF"

# 4. daemons: restart those of an earlier run, then slurmctld and one slurmd per node, each
# with its own conf dir so its PMIx client directory is its own (srun --mpi=pmix collides else)
stop
/usr/sbin/slurmctld -i
for n in "${NAMES[@]}"; do
  mkdir -p "/var/spool/slurmd/$n" "/etc/slurm-$n" "/tmp/pmix-$n"
  ln -sf "$CONF" "/etc/slurm-$n/slurm.conf"
  echo "PMIxCliTmpDirBase=/tmp/pmix-$n" > "/etc/slurm-$n/mpi.conf"
  /usr/sbin/slurmd -N "$n" -f "/etc/slurm-$n/slurm.conf"
done
for _ in $(seq 1 120); do up && break; sleep 0.5; done
if ! up; then
  echo "slurm_local: the nodes did not come up" >&2
  sinfo -N >&2 || true
  tail -n 20 /var/log/slurm/*.log >&2 || true
  exit 1
fi
echo "slurm_local: cluster up ($(sinfo -h -N -o %N | tr '\n' ' ')) in" \
     "$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s"
