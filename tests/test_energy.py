"""Node energy measured with codecarbon: the meter on real CPU work, and the ClientApp's replies."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from clients._energy import CPU_METHODS, UNKNOWN_METHOD, EnergyMeter
from flows.report import CPU_ENERGY_METHODS

REPO = Path(__file__).resolve().parents[1]


def _busy(cpu_seconds: float) -> None:
    """Keep one core busy with real arithmetic for about ``cpu_seconds`` of process CPU time."""
    start, total = time.process_time(), 0
    while time.process_time() - start < cpu_seconds:
        total += sum(i * i for i in range(10_000))


def _measure(cpu_seconds: float):
    """Return the Energy of ``cpu_seconds`` of CPU work, measured by a fresh meter."""
    with EnergyMeter(device="cpu").measure() as energy:
        _busy(cpu_seconds)
    return energy


def test_more_cpu_work_measures_more_energy():
    small = _measure(0.3)
    large = _measure(1.2)

    assert 0 < small.cpu_kwh and 0 < small.ram_kwh
    assert large.cpu_kwh > 2 * small.cpu_kwh, "4x the CPU seconds must measure well over 2x the CPU energy"
    assert large.kwh > small.kwh
    assert large.kwh == pytest.approx(large.cpu_kwh + large.ram_kwh + large.gpu_kwh)
    assert large.gpu_kwh == 0.0, "a block on the CPU reports no GPU energy"
    assert large.kwh < 1000 * large.seconds / 3.6e6, "one process on this machine draws less than 1 kW"
    assert large.cpu_method in CPU_METHODS.values(), "codecarbon must say how it measured the CPU"


def test_a_block_reads_this_process_alone_and_the_sockets_are_counted_once_per_process():
    from codecarbon import emissions_tracker

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a child the meters must not walk to
    try:
        meters = [EnergyMeter(device="cpu"), EnergyMeter(device="cpu")]
        for meter in meters:
            with meter.measure():
                _busy(0.1)
        readings = [(type(h).__name__, h) for m in meters for h in m._tracker._hardware]
    finally:
        child.kill()
        child.wait()

    counted = emissions_tracker.count_physical_cpus.cache_info()
    assert counted.misses == 1 and counted.hits >= 1, "lscpu ran once in this process, then its count was reused"
    cpus = [h for name, h in readings if name == "CPU"]
    assert cpus and all(h._process.children(recursive=True) == [] for h in cpus)
    assert all(h._children is False for name, h in readings if name == "RAM")


def test_energy_replies_under_the_phase_name():
    energy = _measure(0.1)

    metrics = energy.metrics("evaluate")

    assert set(metrics) == {"evaluate-kwh", "evaluate-cpu-kwh", "evaluate-ram-kwh", "evaluate-gpu-kwh",
                            "energy-cpu-method"}
    assert metrics["evaluate-kwh"] == energy.kwh > 0
    assert all(isinstance(v, float) for v in metrics.values()), "Flower's MetricRecord holds numbers only"


def test_a_meter_measures_one_block_and_lets_its_errors_through():
    meter = EnergyMeter(device="cpu")
    with pytest.raises(ZeroDivisionError):
        with meter.measure():
            1 / 0

    with pytest.raises(RuntimeError, match="one EnergyMeter per block"):
        with meter.measure():
            pass


def test_the_report_words_every_method_code_a_node_can_send():
    assert set(CPU_ENERGY_METHODS) == {UNKNOWN_METHOD, *CPU_METHODS.values()}


def test_importing_the_client_app_does_not_import_codecarbon():
    code = "import sys, clients.client_app; print('codecarbon' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False", "a node answering a query must not load codecarbon"


def test_a_train_reply_carries_the_measured_energy(monkeypatch):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import train
    from clients.models import build_model

    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():  # what a ClientApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)
    with open(REPO / "pyproject.toml", "rb") as f:
        run_config = {**tomllib.load(f)["tool"]["flwr"]["app"]["config"], "model": "logreg", "dataset": "digits",
                      "local-epochs": 60, "batch-size": 32, "learning-rate": 0.01}
    start = build_model("logreg", input_shape=(64,), num_classes=10, seed=0, device="cpu").get_arrays()
    sent = Message(RecordDict({
        "arrays": ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in start.items())),
        "config": ConfigRecord({"server-round": 1}),
    }), dst_node_id=0, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 2, "device": "cpu"},
                      state=RecordDict(), run_config=run_config)

    metrics = train(sent, context).content["metrics"]

    assert metrics["train-seconds"] > 0.05, "codecarbon reads no CPU energy for a block under 50 ms: train longer"
    assert metrics["train-kwh"] > 0 and metrics["train-cpu-kwh"] > 0 and metrics["train-gpu-kwh"] == 0.0
    assert metrics["train-kwh"] == pytest.approx(metrics["train-cpu-kwh"] + metrics["train-ram-kwh"])
    assert metrics["energy-cpu-method"] in CPU_METHODS.values()


def test_the_cpu_model_comes_from_proc_cpuinfo_without_the_clock_timing_child():
    script = ("import resource, cpuinfo; from clients._energy import EnergyMeter; m = EnergyMeter(device='cpu'); "
              "m.wait_ready(); c = resource.getrusage(resource.RUSAGE_CHILDREN); "
              "print(m._tracker._conf['cpu_model']); print(c.ru_utime + c.ru_stime)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    model, child_cpu = done.stdout.split("\n")[:2]
    full = subprocess.run([sys.executable, "-c", "import cpuinfo; print(cpuinfo.get_cpu_info()['brand_raw'])"],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert model == full.stdout.strip() != "", "codecarbon must see the model py-cpuinfo's full probe finds"
    if sys.platform.startswith("linux") and "model name" in Path("/proc/cpuinfo").read_text():
        assert float(child_cpu) < 0.5, "py-cpuinfo's clock-timing child busy-waits about 1 s of CPU"


def test_without_a_model_in_proc_cpuinfo_the_full_probe_runs(monkeypatch):
    import cpuinfo

    from clients._energy import _cpu_model_from_proc

    monkeypatch.setattr(cpuinfo.cpuinfo, "_get_cpu_info_from_proc_cpuinfo", lambda: {})  # an ARM kernel's answer
    probed = []

    answer = _cpu_model_from_proc(lambda: probed.append(1) or {"brand_raw": "probed"})

    assert answer == {"brand_raw": "probed"} and probed == [1]
