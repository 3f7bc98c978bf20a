"""A throw-away LAN of Linux network namespaces for tests: one bridge, one namespace per host.

Every name carries the creating process's id (`fcnt-<pid>-<host>`, bridge `fcbr<pid>`), so a run
removes leftovers of the same names and of runs whose process is gone, and never those of a run
still going. Needs root and `ip` (iproute2); `unavailable()` says why not when it cannot work.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

_PREFIX = "fcnt-"


def unavailable() -> str:
    """Return why network namespaces cannot be used here, or '' if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the test as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return "" if made.returncode == 0 else f"`ip netns add` fails here: {made.stderr.strip()}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip args…`; raise RuntimeError with its message if it fails and `check`."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    """Return whether process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lan:
    """A bridge in the root namespace (address .1) and one namespace per host, each on one veth pair."""

    def __init__(self, hosts: list[str]) -> None:
        """Name the LAN's parts; nothing is created before `create()`."""
        self.owner = os.getpid()
        self.bridge = f"fcbr{self.owner}"
        self.hosts = {host: f"{_PREFIX}{self.owner}-{host}" for host in hosts}
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"

    @staticmethod
    def _free_subnet() -> str:
        """Return a /24 prefix in 10.231.0.0/16 that no route of this host uses."""
        routes = _ip("-4", "route").stdout + _ip("-4", "addr").stdout
        for third in [os.getpid() % 250 + 2, *range(2, 252)]:
            if f"10.231.{third}." not in routes:
                return f"10.231.{third}"
        raise RuntimeError("every 10.231.x.0/24 is in use on this host: free one for the test LAN")

    def address(self, host: str) -> str:
        """Return the IPv4 address of `host` on the LAN."""
        return f"{self.subnet}.{list(self.hosts).index(host) + 2}"

    def create(self) -> Lan:
        """Remove leftovers, then create the bridge, the namespaces and their links (loopback up)."""
        self.remove_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, (host, namespace) in enumerate(self.hosts.items()):
            veth = f"fcv{self.owner}h{index}"
            _ip("netns", "add", namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def remove_stale(self) -> None:
        """Delete this LAN's names and those of earlier runs whose process is gone."""
        for namespace in _ip("netns", "list").stdout.split():
            match = re.fullmatch(rf"{_PREFIX}(\d+)-.+", namespace)
            if match and (int(match.group(1)) == self.owner or not _alive(int(match.group(1)))):
                self._delete_namespace(namespace)
        for bridge in re.findall(r"^\d+: (fcbr\d+)[:@]", _ip("-o", "link").stdout, re.M):
            if bridge == self.bridge or not _alive(int(bridge[4:])):
                _ip("link", "delete", bridge, check=False)

    def destroy(self) -> None:
        """Kill every process left in the namespaces, then delete them and the bridge."""
        for namespace in self.hosts.values():
            self._delete_namespace(namespace)
        _ip("link", "delete", self.bridge, check=False)

    @staticmethod
    def _delete_namespace(namespace: str) -> None:
        """Kill the processes inside `namespace` and delete it (its veth pair goes with it)."""
        pids = _ip("netns", "pids", namespace, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "delete", namespace, check=False)

    def start(self, host: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        """Start `argv` inside `host`'s namespace and collect its output."""
        return Proc(["ip", "netns", "exec", self.hosts[host], *argv], env=env, cwd=cwd,
                    name=f"{host}: {' '.join(Path(arg).name for arg in argv[:3])}")

    def __enter__(self) -> Lan:
        """Create the LAN."""
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        """Tear the LAN down, whatever happened."""
        self.destroy()


class Proc:
    """A running command whose output lines are collected as they come."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 name: str = "") -> None:
        """Start `argv` in its own process group, stdout and stderr merged; `name` labels it in messages."""
        self.argv, self.name = argv, name or " ".join(argv[:3])
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        """Collect output lines until the process closes its output."""
        for raw in iter(self.process.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace"))

    @property
    def output(self) -> str:
        """Return everything printed so far."""
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        """Wait until a line contains `text`; raise AssertionError with the output if it does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                if text in self.output:
                    return
                break
            time.sleep(0.2)
        raise AssertionError(f"expected {text!r} from {self.name} within {timeout:.0f} s "
                             f"(exit code {self.process.poll()}), got:\n{self.output[-3000:]}")

    def exit_code(self, timeout: float) -> int:
        """Wait for the process to end and return its exit code."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self, timeout: float = 20.0) -> int:
        """Stop the process with SIGTERM (SIGKILL to its group after `timeout`) and return its exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                return self.exit_code(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.exit_code(timeout)
