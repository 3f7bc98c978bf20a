"""Energy of a block of work on this node, measured with codecarbon's offline tracker.

Private to ``clients`` and free of Flower and Prefect. codecarbon is imported only when
an ``EnergyMeter`` is created, so a node that only answers queries never loads it.

What codecarbon 3.3.2 does here (``tracking_mode="process"``, offline, no output files):

- CPU: where Linux RAPL energy counters are readable, their deltas; otherwise (this
  project's CPU hosts) the CPU's TDP, from codecarbon's table of CPU models or 4 W per
  thread for a model missing from it, times the share of the machine's CPUs that this
  process kept busy (its CPU seconds over the wall seconds).
- Process: this one alone. codecarbon's process mode adds the children's CPU time and
  memory, found by walking every process on the host at each reading; the blocks measured
  here start no processes, so fedcompare reads this process only (``_without_children``).
- RAM: about 5 W per memory module that the process's resident memory fills (a module
  count estimated from its size), at least 10 W on x86 and 3 W on ARM, for the wall time.
- GPU: the NVIDIA driver's (NVML) board energy counter of the tracked GPUs; whole boards,
  so every process using a GPU shares its reading.

codecarbon reads the CPU model (the only field it uses) with py-cpuinfo, whose
``get_cpu_info`` runs a child Python process that busy-waits a whole second on a core to
time the CPU clock. No codecarbon option skips it (even the RAPL path reads the model) and
its cache lives only in the process, while Flower starts a fresh ClientApp process for
every message: 1.4 s of wall and 1.3 s of CPU per message. On Linux, py-cpuinfo takes the
model from /proc/cpuinfo before any other source, so ``_cpu_model_from_proc`` asks
py-cpuinfo's own /proc/cpuinfo parser alone and hands codecarbon the same ``brand_raw``;
elsewhere, or where /proc/cpuinfo names no model (some ARM kernels), py-cpuinfo runs whole.
codecarbon also runs `lscpu` for every tracker to count the CPU sockets; fedcompare counts
them once per process (``_count_sockets_once``). The rest of the set-up (codecarbon's CPU
table with pandas, about 0.4 s) runs in a
background thread, for the caller to load data and build its model meanwhile; ``measure``
waits for what is left. codecarbon takes its closing reading only when 50 ms passed since
its opening one, so a block shorter than that reads almost no CPU energy.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# ISO 3166-1 alpha-3 country that codecarbon's offline tracker requires for its own CO2
# figure; fedcompare never uses that figure (the report multiplies the energy by the
# price table's kg CO2/kWh), so the country changes nothing it reports. USA matches the
# price table's AWS us-east-1 region.
DEFAULT_COUNTRY = "USA"

# How codecarbon measured the CPU, as a number (Flower's MetricRecord holds numbers only):
# codecarbon's CPU mode -> code. flows/report.py words the codes; tests/test_energy.py
# checks that both name the same ones.
CPU_METHODS = {
    "intel_rapl": 1,  # Linux RAPL energy counters (measured)
    "cpu_load": 2,  # TDP x the process's share of CPU time (estimated)
    "constant": 3,  # half the TDP whatever the load (estimated; psutil missing)
    "intel_power_gadget": 4,  # Intel Power Gadget (macOS, Windows)
    "apple_powermetrics": 5,  # powermetrics (macOS)
    "windows_emi": 6,  # Windows Energy Meter Interface (RAPL)
}
UNKNOWN_METHOD = 0


@dataclass
class Energy:
    """Energy one block of work drew, in kWh as codecarbon measured it (no PUE applied)."""

    cpu_kwh: float = 0.0
    ram_kwh: float = 0.0
    gpu_kwh: float = 0.0
    cpu_method: int = UNKNOWN_METHOD  # a value of CPU_METHODS, or UNKNOWN_METHOD
    seconds: float = 0.0  # wall seconds of the block

    @property
    def kwh(self) -> float:
        """Return the block's total energy: CPU plus RAM plus GPU."""
        return self.cpu_kwh + self.ram_kwh + self.gpu_kwh

    def metrics(self, phase: str) -> dict[str, float]:
        """Return the energy as reply metrics named after ``phase`` ("train" or "evaluate")."""
        return {f"{phase}-kwh": self.kwh, f"{phase}-cpu-kwh": self.cpu_kwh, f"{phase}-ram-kwh": self.ram_kwh,
                f"{phase}-gpu-kwh": self.gpu_kwh, "energy-cpu-method": float(self.cpu_method)}


def _cpu_model_from_proc(full_probe: Callable[[], dict]) -> dict:
    """Return py-cpuinfo's answer from /proc/cpuinfo alone when it names the CPU model, else ``full_probe()``."""
    import cpuinfo

    if sys.platform.startswith("linux"):
        try:
            info = cpuinfo.cpuinfo._get_cpu_info_from_proc_cpuinfo()  # pinned py-cpuinfo 9.0.0, Linux's first source
        except Exception:  # noqa: BLE001 - a py-cpuinfo without it, or an unreadable /proc: probe in full
            info = {}
        if info.get("brand_raw"):
            return info
    return full_probe()


def _use_proc_cpuinfo() -> None:
    """Make py-cpuinfo's ``get_cpu_info`` (what codecarbon calls) skip its 1 s clock-timing child where it can."""
    import cpuinfo

    full_probe = cpuinfo.get_cpu_info
    if getattr(full_probe, "__wrapped__", None) is None:
        fast = functools.wraps(full_probe)(lambda: _cpu_model_from_proc(full_probe))
        cpuinfo.get_cpu_info = fast


def _count_sockets_once() -> None:
    """Make codecarbon count this machine's CPU sockets once per process: it runs `lscpu` for every new tracker."""
    from codecarbon import emissions_tracker

    count = getattr(emissions_tracker, "count_physical_cpus", None)  # pinned codecarbon 3.3.2
    if callable(count) and getattr(count, "cache_info", None) is None:
        emissions_tracker.count_physical_cpus = functools.cache(count)


def _without_children(tracker) -> None:
    """Have ``tracker``'s CPU and RAM readings take this process alone, not also its children.

    In process mode codecarbon adds the CPU time and memory of the process's children, which
    psutil finds by reading the status of every process on the host, at each reading (four per
    block). The blocks measured here (a node's training or evaluation) start no processes, and
    on a stack of several nodes or a Ray host with many workers that walk costs about as much
    as a small model's training.
    """
    import psutil

    for hardware in getattr(tracker, "_hardware", []):  # pinned codecarbon 3.3.2: CPU._process, RAM._children
        process = getattr(hardware, "_process", None)
        if isinstance(process, psutil.Process):
            hardware._process = _process_alone()(process.pid)
        if getattr(hardware, "_children", None) is True:
            hardware._children = False


@functools.cache
def _process_alone() -> type:
    """Return a psutil.Process whose children are none (psutil is imported with codecarbon, not before)."""
    import psutil

    class ProcessAlone(psutil.Process):
        def children(self, recursive: bool = False) -> list:  # noqa: ARG002 - psutil's signature
            return []

    return ProcessAlone


class EnergyMeter:
    """Measure blocks of work in this process with codecarbon's offline tracker, per process.

    ``device`` is the node's compute device ("auto", "cpu", "cuda", "cuda:N"): "cpu" tracks no
    GPU; otherwise codecarbon tracks the GPUs in ``CUDA_VISIBLE_DEVICES`` (all when unset), so
    a node that shares a GPU host should set it to its own GPU.
    """

    def __init__(self, *, device: str = "cpu", country_iso_code: str = DEFAULT_COUNTRY) -> None:
        """Create the tracker and start codecarbon's hardware detection in a background thread."""
        from codecarbon import OfflineEmissionsTracker

        _use_proc_cpuinfo()
        _count_sockets_once()
        level = os.environ.get("CODECARBON_LOG_LEVEL", "error")  # quiet unless asked (the import set INFO)
        logging.getLogger("codecarbon").setLevel(level.upper())  # before creating: the tracker logs at once
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=country_iso_code, tracking_mode="process", output_methods=[], log_level=level,
            gpu_ids=[] if device == "cpu" else None, measure_power_secs=15,
        )
        self._used = False
        self._setup_error: BaseException | None = None
        self._setup = threading.Thread(target=self._detect_hardware, name="codecarbon-setup", daemon=True)
        self._setup.start()

    def _detect_hardware(self) -> None:
        """Run codecarbon's hardware detection (cached on the tracker); keep its error for `measure`."""
        try:
            self._tracker.get_detected_hardware()
            _without_children(self._tracker)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread by measure()
            self._setup_error = error

    def wait_ready(self) -> float:
        """Wait for the hardware detection to finish; return the seconds waited."""
        waited = time.perf_counter()
        self._setup.join()
        if self._setup_error is not None:
            raise RuntimeError(
                f"codecarbon could not detect this node's hardware ({self._setup_error!r}); expected it to find "
                "at least a CPU and RAM: run `python -c \"from codecarbon import OfflineEmissionsTracker as T; "
                "print(T(country_iso_code='USA').get_detected_hardware())\"` on the node to see why"
            ) from self._setup_error
        return time.perf_counter() - waited

    @contextmanager
    def measure(self, *, on_gpu: bool = False) -> Iterator[Energy]:
        """Measure the energy of the ``with`` block; the yielded Energy is filled when the block ends.

        ``on_gpu`` says whether the block computed on a GPU; when False its GPU energy is left
        out (NVML reads whole boards: an idle or shared GPU's draw is not this block's).

        Raises:
            RuntimeError: the meter was used before (one tracker measures one block), hardware
                detection failed, or codecarbon returned no measurement.
        """
        if self._used:
            raise RuntimeError("this EnergyMeter already measured a block; create one EnergyMeter per block")
        self._used = True
        self.wait_ready()
        energy = Energy()
        started = time.perf_counter()
        self._tracker.start()
        try:
            yield energy
        finally:
            self._tracker.stop()
            energy.seconds = time.perf_counter() - started
        data = getattr(self._tracker, "final_emissions_data", None)
        if data is None:
            raise RuntimeError(
                "codecarbon measured nothing for this block (its tracker swallows its own errors); expected "
                "CPU and RAM energy: set CODECARBON_LOG_LEVEL=debug on the node to see codecarbon's error"
            )
        energy.cpu_kwh, energy.ram_kwh = float(data.cpu_energy), float(data.ram_energy)
        energy.gpu_kwh = float(data.gpu_energy) if on_gpu else 0.0
        energy.cpu_method = self._cpu_method()

    def _cpu_method(self) -> int:
        """Return the code of how codecarbon measured the CPU (UNKNOWN_METHOD if it does not say)."""
        # codecarbon keeps the mode only on its hardware objects (pinned 3.3.2; tests/test_energy.py
        # fails if a new release moves it)
        for hardware in getattr(self._tracker, "_hardware", []):
            if type(hardware).__name__ == "CPU":
                return CPU_METHODS.get(getattr(hardware, "_mode", ""), UNKNOWN_METHOD)
        return UNKNOWN_METHOD
