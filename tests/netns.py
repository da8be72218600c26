"""Three hosts on one machine: network namespaces joined by a bridge, and a launcher for mpiexec.

Each namespace gets one end of a veth pair with its own address (10.77.N.1-3/24); the bridge in the
root namespace holds 10.77.N.254, where mpiexec and the clients run. MPICH's hydra starts each
host's proxy through `-launcher ssh -launcher-exec LAUNCHER`, calling `LAUNCHER -x HOST COMMAND...`;
the launcher enters the namespace that owns HOST instead of opening an ssh session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

RANKS = 3


def can_make_namespaces() -> str | None:
    """None if this process can make namespaces here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


class Hosts:
    """Three namespaces on a bridge; `close` removes them."""

    def __init__(self, folder: Path):
        tag = f"{os.getpid() % 100000}"
        self.subnet = 10 + os.getpid() % 200
        self.names = [f"puma{tag}h{i}" for i in range(RANKS)]
        self.addresses = [f"10.77.{self.subnet}.{i + 1}" for i in range(RANKS)]
        self.bridge, self.bridge_address = f"pb{tag}", f"10.77.{self.subnet}.254"
        self._made: list[list[str]] = []
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(["link", "del", self.bridge])
            self._ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for i, (ns, address) in enumerate(zip(self.names, self.addresses)):
                self._ip("netns", "add", ns)
                self._made.append(["netns", "del", ns])
                outer, inner = f"pv{tag}h{i}", f"pn{tag}h{i}"
                self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self._ip("link", "set", outer, "master", self.bridge)
                self._ip("link", "set", outer, "up")
                self._ip("link", "set", inner, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
                self._ip("-n", ns, "link", "set", inner, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self.launcher = folder / "enter-host"
        cases = "\n".join(f"  {a}) ns={n} ;;" for a, n in zip(self.addresses, self.names))
        self.launcher.write_text(
            "#!/bin/sh\n# mpiexec calls: enter-host -x HOST COMMAND...\n"
            '[ "$1" = "-x" ] && shift\nhost=$1; shift\n'
            f'case "$host" in\n{cases}\n  *) echo "enter-host: unknown host $host" >&2; exit 1 ;;\nesac\n'
            'exec ip netns exec "$ns" sh -c "$*"\n'
        )
        self.launcher.chmod(0o755)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def mpiexec_args(self) -> list[str]:
        """mpiexec's options that put rank i on host i."""
        return [
            "-launcher", "ssh", "-launcher-exec", str(self.launcher),
            "-hosts", ",".join(self.addresses), "-localhost", self.bridge_address,
        ]

    def close(self) -> None:
        for args in reversed(self._made):
            subprocess.run(["ip", *args], capture_output=True)
        self._made = []
