#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, to try `snakemake --profile slurm all` on a laptop and to test
# the Slurm path for real in CI. Debian/Ubuntu, as root (no systemd, no cgroups); accounting through
# slurmdbd + MariaDB so that `sacct` works (submitit needs it to see a job end). Adapted from the team's
# tested recipe (shared/slurm/slurm-local.sh).
#   slurm/dev-cluster.sh install   # apt packages (~10 s)
#   slurm/dev-cluster.sh start     # write configs, start munged, mariadbd, slurmdbd, slurmctld, slurmd (~2 s)
#   slurm/dev-cluster.sh status    # sinfo and the queue
#   slurm/dev-cluster.sh stop      # stop exactly the daemons started here
# Env knobs: SLURM_CPUS (node CPUs, may exceed nproc: 1-CPU jobs then share cores), SLURM_MEM_MB.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/cmbench-slurm}
ACCT=${SLURM_ACCOUNTING:-1}
NODE=$(hostname -s)
NCPU=${SLURM_CPUS:-$(nproc)}
MEM_MB=${SLURM_MEM_MB:-20000}
log() { echo "[dev-cluster $(date +%T)] $*"; }
wait_for() { local what=$1 tries=$2; shift 2; for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done; log "TIMEOUT waiting for $what"; return 1; }

install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  local pkgs="slurm-wlm munge"
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  apt-get install -y -q --no-install-recommends $pkgs
}

write_config() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge "$STATE"
  local acct_lines="AccountingStorageType=accounting_storage/none"
  [ "$ACCT" = 1 ] && acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localcluster
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120 s; 5 is the least)
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-5}
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${SLURM_DEF_MEM_PER_CPU:-1000}
# trust the CPUs= below even if it exceeds the real core count (lets 1-CPU jobs share 2 cores)
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# sched_interval: the main scheduler also starts a requeued job once its begin time passes (default every 60 s)
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
${acct_lines}
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if [ "$ACCT" = 1 ]; then
    cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
    chmod 600 /etc/slurm/slurmdbd.conf
  fi
}

start() {
  write_config
  : > "$STATE/pids"
  # munge: the package's postinst creates /etc/munge/munge.key; make one if it is missing
  [ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for munged 40 sh -c 'munge -n | unmunge'
  cat /run/munge/munged.pid >> "$STATE/pids"
  log "munged up"
  if [ "$ACCT" = 1 ]; then
    mkdir -p /run/mysqld && chown mysql:root /run/mysqld
    /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid > /var/log/slurm/mariadb.log 2>&1 &
    echo $! >> "$STATE/pids"
    wait_for mariadb 120 mariadb -uroot -e 'select 1'
    mariadb -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    log "mariadb up"
    /usr/sbin/slurmdbd
    wait_for slurmdbd 120 test -s /run/slurmdbd.pid
    cat /run/slurmdbd.pid >> "$STATE/pids"
    # sacctmgr talks to slurmdbd; retry until it answers, then register the cluster (idempotent)
    wait_for sacctmgr 120 sacctmgr -n list cluster
    sacctmgr -i add cluster localcluster >/dev/null 2>&1 || true
    log "slurmdbd up"
  fi
  /usr/sbin/slurmctld
  /usr/sbin/slurmd
  wait_for "node idle" 120 sh -c 'sinfo -h -o %T | grep -q idle'
  cat /run/slurmctld.pid /run/slurmd.pid >> "$STATE/pids"
  log "slurm up: $(sinfo -h -N -o '%N cpus=%c mem=%m %T')"
}

stop() {
  [ -f "$STATE/pids" ] || return 0
  # reverse order: slurmd, slurmctld, slurmdbd, mariadbd, munged
  for pid in $(tac "$STATE/pids"); do kill "$pid" 2>/dev/null || true; done
  for pid in $(cat "$STATE/pids"); do for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done; done
  rm -f "$STATE/pids"; log "stopped"
}


status() {
  sinfo -N -o '%N cpus=%c mem=%m %T'
  squeue -o '%i %j %T %M'
}

case "${1:-}" in
  install|start|stop|status) "$1" ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
