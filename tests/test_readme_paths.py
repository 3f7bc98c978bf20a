"""README's paths beyond the default demo, run as written against a real local stack and a real S3 server.

One stack (two SuperNodes, `fedcompare up --concurrency 2`) started with an S3-compatible
server (`moto_server` on 127.0.0.1) in its environment, as README's "A real MinIO / S3
store" says. Two `fedcompare demo` runs are submitted at once, one into the S3 store and one
into the local store, with their output piped (not a terminal); then `fedcompare report
--store`, the `flwr run .` example, and user errors of every README command, none of which
may print a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3server import moto_server_path, running_s3_server
from tests.integration_stack import FEDCOMPARE, _free_block, _free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(moto_server_path() is None, reason="needs moto_server (pip install 'moto[server]')"),
]
BUCKET_URI = "s3://fc-bucket/team-a"
ROOT = Path(__file__).resolve().parents[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    """Return this process's environment without Prefect/fedcompare settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_", "AWS_"))}
    return {**env, "COLUMNS": "200", **extra}


@pytest.fixture(scope="module")
def s3_env():
    """The endpoint and keys of a running moto_server, as a user would export them."""
    with running_s3_server() as endpoint:
        yield {"FEDCOMPARE_S3_ENDPOINT": endpoint, "FEDCOMPARE_S3_ACCESS_KEY": "fc-key",
               "FEDCOMPARE_S3_SECRET_KEY": "fc-secret", "FEDCOMPARE_S3_RETRY_SECONDS": "5"}


def _cli(state: Path, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `fedcompare --state-dir state args…` with ``env`` and return what it printed."""
    return subprocess.run([FEDCOMPARE, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def _no_traceback(done: subprocess.CompletedProcess[str] | tuple[int, str]) -> None:
    """Fail if a command printed a Python traceback."""
    output = done[1] if isinstance(done, tuple) else done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_env):
    """A two-node local stack that runs two comparisons at once, S3 settings in its environment."""
    state = tmp_path_factory.mktemp("readme-stack")
    ports = ["--prefect-port", str(_free_port()), "--superlink-port", str(_free_port()),
             "--node-base-port", str(_free_block(2)), "--gpu-nodes", "1", "--cpu-nodes", "1", "--concurrency", "2"]
    try:
        started = _cli(state, s3_env, "up", *ports)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "2 comparison(s) at once" in started.stdout
        yield state
    finally:
        stopped = _cli(state, s3_env, "down", timeout=120)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def two_runs(stack, s3_env):
    """Two `fedcompare demo` runs submitted at once: one into the S3 store, one into the local store."""
    configs = {
        "s3": {"store_uri": BUCKET_URI, "rounds": 2, "data": {"dataset": "digits"}},
        "local": {"rounds": 1, "data": {"dataset": "digits"}, "small": {"model": "torch-logreg", "learning_rate": 0.05}},
    }
    def start(config: dict) -> subprocess.Popen:
        return subprocess.Popen([FEDCOMPARE, "--state-dir", str(stack), "demo", "--config", json.dumps(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(s3_env))

    # the second is started once the first has submitted its run (both call `up`, which deploys)
    first, seen = start(configs["s3"]), []
    demos = {"s3": first}
    try:
        for line in first.stdout:
            seen.append(line)
            if "/runs/flow-run/" in line:
                break
        demos["local"] = start(configs["local"])
        done = {name: demo.communicate(timeout=1200)[0] for name, demo in demos.items()}
    finally:
        for demo in demos.values():
            demo.kill()
    done = {name: (demos[name].returncode, ("".join(seen) if name == "s3" else "") + out) for name, out in done.items()}
    ids = {}
    for name, (code, out) in done.items():
        found = re.search(r"/runs/flow-run/([0-9a-f-]{36})", out)
        assert found, f"{name} demo exited {code} before submitting a run:\n{out[-3000:]}"
        ids[name] = found.group(1)
    return done, ids


def test_the_s3_demo_exits_0_and_prints_the_report_from_the_bucket(two_runs, s3_env):
    import boto3

    done, ids = two_runs
    code, output = done["s3"]

    assert code == 0, output[-3000:]
    _no_traceback(done["s3"])
    assert "final accuracy" in output and "recommendation:" in output
    assert f"report:   {BUCKET_URI}/runs/{ids['s3']}/report.json" in output
    s3 = boto3.client("s3", endpoint_url=s3_env["FEDCOMPARE_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id="fc-key", aws_secret_access_key="fc-secret")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="fc-bucket", Prefix=f"team-a/runs/{ids['s3']}/")["Contents"]}
    assert f"team-a/runs/{ids['s3']}/report.json" in keys
    assert {f"team-a/runs/{ids['s3']}/{arm}/round-0002/model.npz" for arm in ("large", "small")} <= keys


def test_piped_demo_output_has_a_line_per_completed_round_of_each_arm(two_runs):
    done, _ = two_runs
    _, output = done["s3"]

    for arm in ("large", "small"):
        assert re.search(rf"^{arm} arm: round 1 done$", output, re.M), output[-3000:]
        assert re.search(rf"^{arm} arm: round 2 done$", output, re.M), output[-3000:]
    assert re.search(r"^flow run \S+: Running$", output, re.M), output[-3000:]


def test_two_comparisons_run_at_once_with_separate_reports(two_runs, stack):
    from prefect.client.orchestration import PrefectClient

    from infra.checkpoints import report_key
    from infra.store import open_store

    done, ids = two_runs
    assert done["local"][0] == 0, done["local"][1][-3000:]
    _no_traceback(done["local"])
    port = json.loads((stack / "stack.json").read_text())["prefect_port"]

    async def read():
        async with PrefectClient(api=f"http://127.0.0.1:{port}/api") as client:
            return [await client.read_flow_run(ids[name]) for name in ("s3", "local")]

    first, second = asyncio.run(read())

    assert first.state.is_completed() and second.state.is_completed()
    assert first.start_time < second.end_time and second.start_time < first.end_time, "the two runs overlapped"
    local = open_store(f"file://{stack}/store").get_json(report_key(ids["local"]))
    assert local["run_key"] == ids["local"] != ids["s3"]
    assert local["arms"]["small"]["model"] == "torch-logreg" and local["arms"]["small"]["rounds"] == 1
    assert not (stack / "store" / "runs" / ids["s3"]).exists(), "the S3 run wrote nothing to the local store"


def test_report_with_store_reads_the_bucket_and_exports(two_runs, stack, s3_env, tmp_path):
    _, ids = two_runs

    shown = _cli(stack, s3_env, "report", "latest", "--store", BUCKET_URI, "--html", str(tmp_path / "r.html"),
                 "--csv", str(tmp_path / "r.csv"))

    assert shown.returncode == 0, shown.stdout + shown.stderr
    _no_traceback(shown)
    assert "federated-compare" in shown.stdout and ids["s3"] in shown.stdout  # the title wraps on narrow terminals
    assert "<table" in (tmp_path / "r.html").read_text() and (tmp_path / "r.csv").read_text().startswith("arm,")


def test_the_flwr_run_example_trains_one_arm_without_prefect(stack, tmp_path):
    from infra.checkpoints import read_manifest
    from infra.store import open_store

    superlink = json.loads((stack / "stack.json").read_text())["superlink_port"]
    home = tmp_path / "flwr-home"
    home.mkdir()
    # README: the connection `local-stack` in $FLWR_HOME/config.toml (default ~/.flwr)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-stack"\n\n[superlink.local-stack]\naddress = "127.0.0.1:{superlink}"\n'
        "insecure = true\n")
    store = tmp_path / "flwr-store"
    flwr = str(Path(sys.executable).parent / "flwr")

    done = subprocess.run(
        [flwr, "run", ".", "local-stack", "--stream", "--run-config",
         f'rounds=1 arm="small" model="logreg" dataset="digits" store-uri="{store}"'],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env({"FLWR_HOME": str(home)}))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _no_traceback(done)
    assert read_manifest(open_store(f"file://{store}"), "manual", "small")["latest_complete_round"] == 1


@pytest.mark.parametrize("args", [
    ("demo", "--config", "{not json"),
    ("demo", "--config", '{"rounds": 0}'),
    ("demo", "--config", '{"store_uri": "ftp://elsewhere"}'),
    ("report", "no-such-run"),
    ("report", "latest", "--store", "ftp://elsewhere"),
    ("report", "latest", "--store", "s3://fc-bucket/team-a", "--html", "/proc/no/such/dir/r.html"),
    ("up", "--concurrency", "0"),
])
def test_user_errors_of_readme_commands_print_one_line_and_no_traceback(stack, s3_env, args):
    done = _cli(stack, s3_env, *args, timeout=300)

    assert done.returncode in (1, 2), done.stdout + done.stderr
    _no_traceback(done)
    assert done.stderr.strip().count("\n") <= 2, done.stderr  # argparse adds its usage line


def test_an_s3_store_without_an_endpoint_is_one_line_before_anything_is_submitted(stack):
    done = _cli(stack, {}, "demo", "--config", json.dumps({"store_uri": BUCKET_URI, "rounds": 1}), timeout=300)

    assert done.returncode == 1
    _no_traceback(done)
    assert "FEDCOMPARE_S3_ENDPOINT" in done.stderr and "/runs/flow-run/" not in done.stdout, done.stdout + done.stderr
