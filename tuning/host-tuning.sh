#!/usr/bin/env bash
# What a flowattr collector node needs from its host (docs/operations.md, "Host tuning", says
# why each setting is there and what it measured). The collector checks the same settings at
# start and warns, naming the fix, for each one missing.
#
#   tuning/host-tuning.sh            apply the kernel settings now, and show the process limits
#   tuning/host-tuning.sh --persist  also write them to /etc/sysctl.d/90-flowattr.conf
#   tuning/host-tuning.sh --check    only report what differs (exit 1 if anything does)
set -euo pipefail

mode=apply
case "${1:-}" in
  --persist) mode=persist ;;
  --check) mode=check ;;
  "") ;;
  *) echo "usage: $0 [--persist|--check]" >&2; exit 2 ;;
esac

# Kernel settings: name and the least value the node wants.
# For net.ipv4.tcp_rmem only its third field (the most a receive buffer autotunes to) is
# compared; the collector leaves its sockets to autotuning.
settings=(
  "net.core.somaxconn 4096"          # exporters reconnecting together after a node restart
  "net.ipv4.tcp_rmem 16777216"       # a receive window that holds one of the largest batches
)

differs=0
for entry in "${settings[@]}"; do
  read -r name want <<<"$entry"
  have=$(sysctl -n "$name" | awk '{print $NF}')
  if (( have >= want )); then
    echo "ok       $name = $have"
    continue
  fi
  differs=1
  if [[ $mode == check ]]; then
    echo "missing  $name = $have (wants $want)"
  else
    value=$want
    if [[ $name == net.ipv4.tcp_rmem ]]; then
      value="$(sysctl -n "$name" | awk '{print $1, $2}') $want"
    fi
    sysctl -q -w "$name=$value"
    echo "set      $name = $value (was $have)"
  fi
done

if [[ $mode == persist ]]; then
  {
    echo "# flowattr collector (tuning/host-tuning.sh)"
    for entry in "${settings[@]}"; do
      read -r name want <<<"$entry"
      echo "$name = $(sysctl -n "$name")"
    done
  } >/etc/sysctl.d/90-flowattr.conf
  echo "wrote    /etc/sysctl.d/90-flowattr.conf"
fi

# Process limits belong to the service that runs the collector, not to this shell.
nofile=$(ulimit -n)
echo
echo "process limits of this shell: open files $nofile (RLIMIT_MEMLOCK is not needed: docs/operations.md)"
echo "run the collector with (systemd unit, [Service] section):"
echo "  LimitNOFILE=1048576     # one per exporter connection, plus segments and sinks"
echo "  CPUAffinity=            # leave unset, or give the node at least node.cpus CPUs"
echo "CPUs this shell may run on: $(taskset -pc $$ | awk -F': ' '{print $2}') of $(nproc --all)"

if [[ $mode == check ]]; then exit "$differs"; fi
