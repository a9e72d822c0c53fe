#!/usr/bin/env bash
# Install Debian's Slurm (slurm-wlm: slurmctld, slurmd, sbatch, srun, ...), munge and iproute2
# when missing, for the Slurm test bed of tests/cluster/. Needs root and apt-get; does nothing when
# they are installed already. No daemon is started or enabled: the test bed runs its own
# munged/slurmctld/slurmd with its own key and config (tests/cluster/testbed.sh).
set -euo pipefail
need=() pkgs=()
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged ip; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
[ "${#need[@]}" = 0 ] && { echo "install_slurm: slurm-wlm, munge and iproute2 are installed"; exit 0; }
for bin in "${need[@]}"; do
  case $bin in munged) pkgs+=(munge);; ip) pkgs+=(iproute2);; *) pkgs+=(slurm-wlm);; esac
done
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
[ "$(id -u)" = 0 ] || { echo "install_slurm: missing ${need[*]}; installing ${pkgs[*]} needs root" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "install_slurm: missing ${need[*]} and no apt-get (Debian/Ubuntu only)" >&2; exit 1; }
echo "install_slurm: missing ${need[*]}: apt-get install ${pkgs[*]}"
# Keep the packages' init scripts from starting system daemons during the install (Debian's
# policy-rc.d mechanism); an existing policy is left as it is.
policy=/usr/sbin/policy-rc.d own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1
fi
trap 'if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${pkgs[@]}"; then
  apt-get update
  apt-get install -y --no-install-recommends "${pkgs[@]}"
fi
for bin in "${need[@]}"; do command -v "$bin" >/dev/null || { echo "install_slurm: $bin still missing" >&2; exit 1; }; done
echo "install_slurm: installed $(dpkg-query -W -f='${Package} ${Version}, ' "${pkgs[@]}" 2>/dev/null)"
