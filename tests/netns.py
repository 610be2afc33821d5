"""Network namespaces for the fleet tests: a bridge in the test's namespace and one namespace per
machine (a veth each, its far end `eth0` with its own address), so each pipeline host, and Redis,
has a network of its own and a link the test can pull (link down: a partition). Needs root
(CI has it); names carry the test's pid, so parallel runs never collide."""

from __future__ import annotations

import os
import random
import subprocess

import pytest


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    def __init__(self, machines: list[str]):
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root (CI runs as root)")
        self.tag = f"vp{os.getpid() % 100000}"
        self.bridge = f"{self.tag}b"
        routes = _ip("-4", "route").stdout
        for _ in range(50):  # a /24 no route of this machine uses
            subnet = f"10.{random.randint(100, 199)}.{random.randint(0, 254)}"
            if f"{subnet}." not in routes:
                break
        self.subnet = subnet
        self.address = {name: f"{subnet}.{i + 2}" for i, name in enumerate(machines)}
        self.namespace = {name: f"{self.tag}-{name}" for name in machines}
        self.link = {name: f"{self.tag}{name}"[:15] for name in machines}  # our end of each machine's cable
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name in machines:
                ns, link = self.namespace[name], self.link[name]
                _ip("netns", "add", ns)
                _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p"[:15])
                _ip("link", "set", f"{link}p"[:15], "netns", ns)
                _ip("-n", ns, "link", "set", f"{link}p"[:15], "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "set", link, "master", self.bridge)
                _ip("link", "set", link, "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            pytest.fail(f"could not build the test network: {' '.join(exc.cmd)}: {exc.stderr.strip()}")

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace[name]]

    def cut(self, name: str) -> None:
        """Pull the machine's cable: its link goes down, nothing reaches it or leaves it."""
        _ip("link", "set", self.link[name], "down")

    def mend(self, name: str) -> None:
        _ip("link", "set", self.link[name], "up")

    def close(self) -> None:
        for ns in getattr(self, "namespace", {}).values():
            _ip("netns", "del", ns, check=False)  # takes the veth pair with it
        _ip("link", "del", self.bridge, check=False)
