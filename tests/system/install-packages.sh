#!/usr/bin/env bash
# Debian packages for tests/system (a real sshd + pdsh, a one-node Slurm with munge), which .ci/run
# calls before pytest. Best effort and quick: already-installed packages are not fetched again, and
# any failure only prints a warning, so those tests then skip and say why.
set -u
packages=(openssh-server openssh-client pdsh slurmctld slurmd slurm-client munge)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-packages: needs root and apt-get; the ssh and Slurm tests will skip" >&2
  exit 0
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-packages: ${missing[*]}"
  # policy-rc.d exit 101 keeps the packages' services (sshd on :22, slurmctld, munge) from starting.
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added_policy=1; }
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || echo "install-packages: apt-get failed; the ssh and Slurm tests will skip" >&2
  [ -n "${added_policy:-}" ] && rm -f "$policy"
fi
# sshd's privilege-separation directory, which its service would create when starting.
mkdir -p -m 0755 /run/sshd
exit 0
