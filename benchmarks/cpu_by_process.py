"""Where the CPU goes while a command runs: CPU seconds per kind of process (Linux /proc).

Runs the command, samples every process's user + system time from /proc once a second, and
when the command ends prints one JSON line: the command's exit code and wall time, the CPU
seconds of all processes seen, and per kind (``clientapp``, ``serverapp``, ``superlink``,
``supernode``, ``superexec``, ``flow-run``, ``prefect-server``, ... by command line) the CPU
seconds and the number of processes. Processes that live less than a second may be missed
and a process's last second is not counted, so the figures are lower bounds. Example::

    python benchmarks/cpu_by_process.py -- make test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KINDS = (  # first match of a command-line fragment wins
    ("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp"), ("flower-superexec", "superexec"),
    ("flower-superlink", "superlink"), ("flower-supernode", "supernode"), ("prefect.engine", "flow-run"),
    ("prefect server", "prefect-server"), ("prefect worker", "prefect-worker"), ("moto_server", "s3-server"),
    ("chrom", "chromium"), ("bin/fedcompare", "fedcompare-cli"), ("bin/flwr ", "flwr-cli"), ("pytest", "pytest"),
    ("sys.stdin.readline", "pytest-worker"), ("pip", "pip"),
)


def _kind(command: str) -> str:
    """Return the kind of a process from its command line (``other:<program>`` when none matches)."""
    for fragment, kind in KINDS:
        if fragment in command:
            return kind
    return "other:" + command.split(" ", 1)[0].rsplit("/", 1)[-1][:40]


def _sample(seen: dict[tuple[str, str], tuple[str, float]], ticks: int) -> None:
    """Record the CPU seconds so far of every process, keyed by pid and start time."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                fields, command = stat.read(), cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if not command:
            continue  # kernel threads
        after_name = fields[fields.rindex(")") + 2:].split()
        cpu = (int(after_name[11]) + int(after_name[12])) / ticks  # utime + stime
        key = (pid, after_name[19])  # a pid is reused, a (pid, start time) is not
        seen[key] = (seen[key][0] if key in seen else _kind(command), cpu)


def main() -> None:
    """Run the command, sampling /proc every --interval seconds; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --, e.g. -- make test")
    if not os.path.isdir("/proc/self"):
        parser.error("needs Linux /proc")
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[tuple[str, str], tuple[str, float]] = {}
    before = {}
    _sample(before, ticks)  # what already ran before the command is not the command's
    start = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        _sample(seen, ticks)
        time.sleep(args.interval)
    wall = time.monotonic() - start
    totals: dict[str, list[float]] = {}
    for key, (kind, cpu) in seen.items():
        total = totals.setdefault(kind, [0.0, 0])
        total[0] += cpu - (before[key][1] if key in before else 0.0)
        total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    print(json.dumps({
        "benchmark": "cpu_by_process", "command": command, "exit_code": child.returncode,
        "wall_seconds": round(wall, 1), "cpus": os.cpu_count(),
        "cpu_seconds": round(sum(t[0] for t in totals.values()), 1),
        "by_kind": {kind: {"cpu_seconds": round(cpu, 1), "processes": int(count)} for kind, (cpu, count) in ranked},
    }))
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
