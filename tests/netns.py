"""Simulated machines for network tests: one Linux network namespace per host.

Every host's namespace is joined to a bridge of the test's own by a veth pair. Addresses are
link-local (one /24 of 169.254.0.0/16, chosen free) and exist only on those links, so traffic
between the hosts (and from the test, through the bridge's address) goes nowhere else: the
namespaces have no other route. Pulling a host's cable is ``ip link set ... down``.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, or the kernel refuses)."""


@dataclass(frozen=True)
class Host:
    name: str         # the namespace
    address: str      # its address on the bridge's link
    switch_port: str  # the veth end on the bridge (the test's side of the cable)

    @property
    def exec_prefix(self) -> list[str]:
        """Run a command on this host: ``[*host.exec_prefix, command...]``."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Network:
    """A bridge and the hosts on it; :meth:`close` removes every namespace, veth and the bridge."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2's `ip` is not installed (.ci/run installs it)")
        self.tag = uuid.uuid4().hex[:4]
        self.subnet = _free_link_local_subnet()
        self.bridge = f"atb{self.tag}"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a bridge here: {exc}") from None
        try:
            # Bridged frames skip iptables: a host firewall's FORWARD policy (Docker's DROP) must
            # not decide whether these test hosts reach each other.
            _ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0")
            _ip("addr", "add", f"{self.subnet[254]}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise

    @property
    def gateway(self) -> str:
        """The test's own address on the bridge (the root namespace)."""
        return str(self.subnet[254])

    def add_host(self, label: str) -> Host:
        index = len(self.hosts) + 1
        name = f"alpa-{self.tag}-{label}"
        port = f"at{self.tag}p{index}"
        inner = f"at{self.tag}i{index}"
        try:
            _ip("netns", "add", name)
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a network namespace: {exc}") from None
        self._namespaces.append(name)
        host = Host(name, str(self.subnet[index]), port)
        _ip("link", "add", port, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("-n", name, "link", "set", inner, "name", "eth0")
        _ip("-n", name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("link", "set", port, "master", self.bridge)
        _ip("link", "set", port, "up")
        self.hosts.append(host)
        return host

    def cut(self, host: Host) -> None:
        """Pull the cable at the switch: the host's packets vanish without an error on either side."""
        _ip("link", "set", host.switch_port, "down")

    def cut_host_side(self, host: Host) -> None:
        """Take the host's own interface down (its end of the cable)."""
        _ip("-n", host.name, "link", "set", "eth0", "down")

    def restore(self, host: Host) -> None:
        _ip("-n", host.name, "link", "set", "eth0", "up")
        _ip("link", "set", host.switch_port, "up")

    def close(self) -> list[str]:
        """Delete every namespace (their veth pairs go with them) and the bridge; returns what failed."""
        errors = []
        for name in reversed(self._namespaces):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                errors.append(f"ip netns del {name}: {done.stderr.strip()}")
        self._namespaces.clear()
        for host in self.hosts:  # normally gone with its namespace
            subprocess.run(["ip", "link", "del", host.switch_port], capture_output=True, timeout=30)
        done = subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, text=True, timeout=30)
        if done.returncode != 0 and "Cannot find device" not in done.stderr:
            errors.append(f"ip link del {self.bridge}: {done.stderr.strip()}")
        return errors


def _free_link_local_subnet() -> ipaddress.IPv4Network:
    """A 169.254.N.0/24 that no interface or route on this machine uses yet."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    taken = routes + addresses
    candidates = list(range(64, 192))
    random.shuffle(candidates)
    for third in candidates:
        if f"169.254.{third}." not in taken:
            return ipaddress.IPv4Network(f"169.254.{third}.0/24")
    raise NetnsUnavailable("no free 169.254.N.0/24 for the test network")
