"""What the benchmark reads from /proc: CPU time of processes and of the machine, RSS.

Linux only. CPU figures are utime + stime (all threads of a process); the machine's
busy time is everything in /proc/stat's first line but idle and iowait, so it
includes every other user of the machine.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from kvstore.errors import KVError


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of process ``pid`` (all its threads), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def _child_pids() -> list[int]:
    me, children = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == me:
                children.append(int(entry))
    return children


def machine_s() -> tuple[float, float, float]:
    """The machine's busy time and, of it, the time in interrupts (mostly softirq: the
    loopback TCP stack's receive work) and the time stolen (a virtual machine's host ran
    something else on its CPUs), all in CPU seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    ticks = _clock_ticks()
    return (sum(fields[:8]) - idle) / ticks, (fields[5] + fields[6]) / ticks, fields[7] / ticks


def _own_cpu_s() -> float:
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU used from start() to stop(), in cores (CPU seconds per second of wall time).

    Figures: "client" (this process and its worker processes, their start-up before
    start() excluded), one per named process (``pids``, e.g. primary, backup, zookeeper),
    "interrupts" (irq + softirq time, mostly loopback TCP's receive processing; the kernel
    also charges it to whichever process it interrupted, so it overlaps the figures
    above), "steal" (time a virtual machine's host gave its CPUs to others: part of
    "other", the one part nothing in this machine did), "machine" (everything), and
    "other" (machine minus the client and the named processes: other users of the
    machine). The machine's figures come from /proc/stat's tick sampling while process
    times are exact, so "other" is only good to about +-0.2 cores (it reads below zero on
    a lightly loaded machine); "steal" is the kernel's own count, not a difference.
    A figure is None when it cannot be known (a process gone or restarted meanwhile).
    """

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._started: dict[str, float | None] = {}
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        known = set(self._pids.values())
        workers = [pid for pid in _child_pids() if pid not in known]
        start_up = sum(process_cpu_s(pid) or 0.0 for pid in workers)
        self._started = self._sample()
        self._started["client"] = _own_cpu_s() + start_up

    def _sample(self) -> dict[str, float | None]:
        busy_s, interrupts_s, steal_s = machine_s()
        sample: dict[str, float | None] = {
            "client": _own_cpu_s(),
            "machine": busy_s,
            "interrupts": interrupts_s,
            "steal": steal_s,
        }
        for name, pid in self._pids.items():
            sample[name] = None if pid is None else process_cpu_s(pid)
        return sample

    def stop(self) -> dict[str, float | None]:
        wall_s = max(time.monotonic() - self._began, 1e-9)
        now = self._sample()
        cores: dict[str, float | None] = {}
        for name, then in self._started.items():
            current = now.get(name)
            cores[name] = None if then is None or current is None else (current - then) / wall_s
        ours = [cores[name] for name in ("client", *self._pids)]
        machine = cores["machine"]
        cores["other"] = (
            None if machine is None or None in ours else machine - sum(ours)  # type: ignore[arg-type]
        )
        return cores


def vm_rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` in KiB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KVError(f"no VmRSS for process {pid}")
