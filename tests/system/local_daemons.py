"""Real daemons for the multi-node tests, each confined to a directory of its own and stopped
when its block ends; nothing outside that directory is written.

sshd: a real OpenSSH server on 127.0.0.1 with throwaway host and user keys, a non-default port,
and an ssh client configuration that makes "node1" and "node2" aliases of this machine.
DeepSpeed's runner calls plain `ssh` (its reachability check) and pdsh calls `ssh` from PATH, so
the client side is an `ssh` shim first on PATH that adds `-F <this config>`: what a user's
~/.ssh/config does on a real cluster, without editing /root/.ssh.

Slurm: munged with its own key and socket, slurmctld and slurmd from a generated slurm.conf
naming this machine as its one node (non-default ports, state and spool in the directory). The
commands (sbatch, sinfo, scontrol) find it through SLURM_CONF.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from conftest import free_port

HOSTS = ("node1", "node2")


class Unavailable(Exception):
    """A daemon cannot run here (package missing, no privilege-separation directory, ...)."""


@dataclass
class SshCluster:
    root: Path
    port: int

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with the ssh shim first on PATH."""
        return {**base, "PATH": f"{self.root / 'bin'}{os.pathsep}{base.get('PATH', '')}"}


def _require(*tools: str) -> None:
    missing = [t for t in tools if not (shutil.which(t) or Path(t).is_file())]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (tests/system/install-packages.sh installs them)")


def _write_configs(root: Path, port: int) -> None:
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n")
    (root / "ssh_config").write_text(
        f"Host {' '.join(HOSTS)}\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {root / 'user_key'}\n  IdentitiesOnly yes\n  UserKnownHostsFile {root / 'known_hosts'}\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {(root / 'host_key.pub').read_text()}")
    shim = root / "bin" / "ssh"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
    shim.chmod(0o755)


@contextmanager
def sshd(root: Path, timeout: float = 20) -> Iterator[SshCluster]:
    """sshd in the foreground (so this process owns it) until the block ends."""
    _require("/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        raise Unavailable("/run/sshd (sshd's privilege-separation directory) is missing: "
                          "tests/system/install-packages.sh creates it")
    port = free_port()
    _write_configs(root, port)
    log = root / "sshd.log"
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(root / "sshd_config"), "-E", str(log)])
    cluster = SshCluster(root, port)
    try:
        deadline = time.time() + timeout
        while subprocess.run(["ssh", HOSTS[0], "true"], env=cluster.env(dict(os.environ)),
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise Unavailable(f"sshd did not accept a login on port {port}: "
                                  f"{log.read_text()[-500:] if log.exists() else 'no log'}")
            time.sleep(0.2)
        yield cluster
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class SlurmCluster:
    root: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.root / "slurm.conf")}

    def run_job(self, sbatch_args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[str, str]:
        """Submit with sbatch and wait for the job to end: (final state, its id). Polls scontrol
        twice a second (`sbatch --wait` polls with a growing interval: ~20 s late here)."""
        job = subprocess.run(["sbatch", "--parsable", *sbatch_args], env=env, capture_output=True, text=True,
                             check=True).stdout.strip().split(";")[0]
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                                  text=True).stdout
            state = info.split("JobState=")[1].split()[0] if "JobState=" in info else "UNKNOWN"
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
                return state, job
            time.sleep(0.5)
        subprocess.run(["scancel", job], env=env)
        return "TIMEOUT (test)", job


def _slurm_conf(root: Path, node: str, cpus: int) -> str:
    return "\n".join([
        "ClusterName=bifocal-test", f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", f"SlurmUser={getpass.getuser()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        # No cgroups, accounting or mail: what a container without systemd can run.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MailProg=/bin/true", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
        # The node's CPU count is what this file says, so two tasks fit on a one-core machine too.
        "SlurmdParameters=config_overrides",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""])


@contextmanager
def slurm(root: Path, timeout: float = 30) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd in the foreground until the block ends."""
    _require("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)  # rank 0's address is the node's name, as on a real cluster
    except OSError:
        raise Unavailable(f"this machine's name {node!r} does not resolve") from None
    for d in ("state", "spool"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(_slurm_conf(root, node, max(2, os.cpu_count() or 1)))
    cluster = SlurmCluster(root)
    env = cluster.env(dict(os.environ))
    procs = [subprocess.Popen(["munged", "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                               f"--key-file={key}", f"--log-file={root / 'munged.log'}",
                               f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}"])]
    try:
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([daemon, "-D", "-f", str(root / "slurm.conf")], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                             text=True).stdout.strip() != "idle":
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                logs = " | ".join(f"{n}: {(root / n).read_text()[-300:]}" for n in
                                  ("munged.log", "slurmctld.log", "slurmd.log") if (root / n).exists())
                raise Unavailable(f"Slurm did not come up with an idle node: {logs}")
            time.sleep(0.3)
        yield cluster
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
