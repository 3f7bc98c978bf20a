"""A real deployment across network namespaces, and the deployment guide and compose file it documents.

The `integration` test builds a LAN of Linux network namespaces (tests/netns.py): one for the
SuperLink, four for nodes and one for nodes that must be refused, bridged to the root namespace.
It follows docs/deployment.md with the real CLI (`fedcompare certs create`, `superlink start`,
`node start`, `node register`, `node unregister`), gives each node its own share of `digits` as
a CSV or NPZ file (an image folder cannot carry digits' 64 tabular features), and runs the
`federated-compare` flow from the root namespace over TLS under Prefect's test harness: about
2 minutes on 2 idle cores. Unregistered keys, a foreign CA and a bad data file are refused.
The unit tests check that every `fedcompare` command in the guide parses with the real CLI
and that infra/compose.yaml is a complete stack with no secret written into it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.netns import Lan, Proc, unavailable

ROOT = Path(__file__).resolve().parents[1]
GUIDE, COMPOSE = ROOT / "docs" / "deployment.md", ROOT / "infra" / "compose.yaml"
FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")
SITES = ("site_0", "site_1", "site_2", "site_3")
PORT = 8000  # the SuperLink has its namespace to itself: the default port is free there
SEED, CENTRAL_TEST = 0, 0.2
NO_NETNS = unavailable()  # why network namespaces cannot be used here ('' when they can)


# ----------------------------------------------------------------------------- the guide


def guide_commands(text: str) -> list[str]:
    """Return every `fedcompare …` command line in the fenced code blocks of a markdown text."""
    commands = []
    for block in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            match = re.search(r"(?:^|\s)(fedcompare\s.*)$", line)
            if match and not line.startswith("#"):
                commands.append(match.group(1))
    return commands


def test_every_fedcompare_command_in_the_guide_parses_with_the_real_cli():
    from cli.main import _parser

    commands = guide_commands(GUIDE.read_text(encoding="utf-8"))

    parsed = {}
    for command in commands:
        try:
            parsed[command] = _parser().parse_args(shlex.split(command, comments=True)[1:])
        except SystemExit:
            pytest.fail(f"docs/deployment.md: `{command}` does not parse with `fedcompare`'s argument parser")
    verbs = {(args.command, getattr(args, "action", None)) for args in parsed.values()}
    assert {("certs", "create"), ("superlink", "start"), ("node", "start"), ("node", "register"),
            ("node", "unregister")} <= verbs
    assert any(args.command == "superlink" and args.node_keys for args in parsed.values())  # an indented block
    assert any(args.command == "node" and args.root_certificates and args.auth_key for args in parsed.values())


def test_the_guide_check_finds_continued_and_prefixed_commands_and_rejects_wrong_flags(capsys):
    from cli.main import _parser

    text = "```bash\n$ fedcompare certs create --out certs \\\n    --nodes a\nsudo -u x fedcompare up  # note\n```\n"

    assert guide_commands(text) == ["fedcompare certs create --out certs      --nodes a", "fedcompare up  # note"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["node", "start", "--superlink", "h:8000", "--data", "a.csv", "--ca", "ca.crt"])


# ------------------------------------------------------------------------- compose file


def _compose() -> dict:
    """Return infra/compose.yaml parsed."""
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _env(service: dict) -> dict[str, str]:
    """Return a service's environment as a mapping, whichever form the file uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_stack_has_every_part_with_its_ports_and_volumes():
    compose = _compose()
    services = compose["services"]

    assert {"minio", "minio-init", "postgres", "prefect-server", "prefect-worker", "superlink"} <= set(services)
    published = {name: {str(port).split(":")[-2] if str(port).count(":") else str(port)
                        for port in service.get("ports", [])} for name, service in services.items()}
    assert {"9000", "9001"} <= published["minio"] and "4200" in published["prefect-server"]
    assert "8000" in published["superlink"] and not published.get("postgres")
    link = services["superlink"]
    command = " ".join(link["command"]) if isinstance(link["command"], list) else link["command"]
    assert "superlink start" in command and "--tls-dir /certs" in command and "--database /state/" in command
    mounts = [str(volume) for volume in link["volumes"]]
    assert any(m.startswith("./certs:/certs") or m.startswith("../certs:/certs") for m in mounts), mounts
    named = {m.split(":")[0] for name in services for m in map(str, services[name].get("volumes", []))}
    assert {"superlink-state", "postgres-data", "minio-data"} <= named & set(compose["volumes"])
    assert "mc mb" in json.dumps(services["minio-init"]) and "service_healthy" in json.dumps(services["minio-init"])
    worker = _env(services["prefect-worker"])
    assert worker["FEDCOMPARE_SUPERLINK"] == "superlink:8000"
    assert worker["FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES"].startswith("/certs/")
    assert worker["FEDCOMPARE_STORE"].startswith("s3://") and "postgresql" in \
        _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_compose_file_holds_no_secret():
    secret = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|POSTGRES_USER")

    for name, service in _compose()["services"].items():
        for key, value in _env(service).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}: {key} must come from .env"
        for value in _env(service).values():
            literal = re.sub(r"\$\{[^}]*\}", "", value)  # what is left once compose substitutes variables
            assert not re.search(r"://[^/@\s]*:[^@\s]+@", literal), f"{name}: a password in a URL: {value}"
    assert "minioadmin" not in COMPOSE.read_text() and "changeme" not in COMPOSE.read_text().lower()


# ------------------------------------------------------------------- across namespaces


def _write_node_files(folder: Path) -> dict[str, Path]:
    """Write each site's share of digits (outside the central test set) as CSV or NPZ; return site -> file."""
    from clients.data import load_dataset, node_data

    digits = load_dataset("digits")
    files = {}
    for index, site in enumerate(SITES):
        train, test = node_data(digits, partition_id=index, num_partitions=len(SITES), scheme="iid", seed=SEED,
                                alpha=0.5, classes_per_node=2, central_test_fraction=CENTRAL_TEST,
                                local_test_fraction=0.15)
        x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
        if index < 2:
            files[site] = _write_csv(folder / f"{site}.csv", x, y, label="label")
        else:
            files[site] = folder / f"{site}.npz"
            np.savez(files[site], x=x, y=y)
    return files


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, *, label: str) -> Path:
    """Write features and labels as a CSV with a header row; return the path."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"pixel_{i}" for i in range(x.shape[1])), label])
        writer.writerows([*map(float, row), int(label_)] for row, label_ in zip(x, y))
    return path


def _cli(*args: str) -> str:
    """Run `fedcompare args…` here and return its output; fail the test if it fails."""
    done = subprocess.run([FEDCOMPARE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


_FLOW = textwrap.dedent("""
    import json, sys
    from prefect.testing.utilities import prefect_test_harness
    from flows.compare import federated_compare
    from flows.config import CompareConfig

    with prefect_test_harness(server_startup_timeout=120):
        result = federated_compare(CompareConfig.model_validate_json(sys.argv[1]))
    print("RESULT " + json.dumps(result["run_key"]))
""")


def _run_flow(config: dict, env: dict[str, str], timeout: float) -> str:
    """Run the federated-compare flow under Prefect's test harness in a fresh process; return its run key."""
    done = subprocess.run([sys.executable, "-c", _FLOW, json.dumps(config)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    print(done.stderr[-8000:])  # the flow's log: shown by pytest -s and on failure
    found = re.search(r"^RESULT \"(.+)\"$", done.stdout, re.M)
    assert done.returncode == 0 and found, (done.stdout + done.stderr)[-6000:]
    return found.group(1)


def _one_line_refusal(node: Proc) -> str:
    """Wait for a refused `node start` to exit 1 and return its last line, which must be fedcompare's reason."""
    assert node.exit_code(timeout=90) == 1, node.output[-3000:]
    last = node.output.strip().splitlines()[-1]
    assert last.startswith("fedcompare: "), node.output[-3000:]
    return last


@pytest.mark.integration
@pytest.mark.skipif(bool(NO_NETNS), reason=NO_NETNS or "network namespaces are available")
def test_a_tls_federation_across_network_namespaces_runs_the_comparison(tmp_path):
    # Arrange: a LAN, the certificates and keys, and each site's own data file
    lan = Lan(["link", *SITES, "guest"])
    link_ip = lan.address("link")
    files = _write_node_files(tmp_path)
    digits_x, digits_y = np.load(files["site_2"])["x"], np.load(files["site_2"])["y"]
    bad = _write_csv(tmp_path / "bad.csv", digits_x[:20], digits_y[:20], label="digit")  # no `label` column
    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    _cli("certs", "create", "--out", str(certs), "--server-ip", link_ip, "--nodes", ",".join(SITES))
    _cli("certs", "create", "--out", str(other), "--server-ip", link_ip)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_"))},
           "OMP_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "COLUMNS": "200"}
    running: list[Proc] = []
    started, phases = time.monotonic(), []

    def phase(name: str) -> None:
        """Note how long the test has run when `name` is done."""
        phases.append(f"{time.monotonic() - started:6.1f} s  {name}")

    def node(host: str, data: Path, *extra: str, port: int = 9094) -> Proc:
        """Start `fedcompare node start` on `host` as the guide does (later flags win)."""
        running.append(lan.start(host, [FEDCOMPARE, "node", "start", "--superlink", f"{link_ip}:{PORT}",
                                        "--data", str(data), "--root-certificates", str(certs / "ca.crt"),
                                        "--device", "cpu", "--port", str(port),
                                        "--state-dir", str(tmp_path / "state" / host), *extra], env=env))
        return running[-1]

    with lan:
        try:
            link = lan.start("link", [FEDCOMPARE, "superlink", "start", "--host", link_ip, "--port", str(PORT),
                                      "--tls-dir", str(certs), "--state-dir", str(tmp_path / "state" / "link")],
                             env=env)
            running.append(link)
            link.wait_for("superlink ready", timeout=120)
            phase("superlink ready, node keys registered")
            _cli("certs", "create", "--out", str(certs), "--nodes", "intruder")  # after the SuperLink registered keys
            sites = [node(site, files[site], "--tier", "gpu" if i < 2 else "cpu",
                          "--auth-key", str(certs / "nodes" / f"{site}.key")) for i, site in enumerate(SITES)]
            intruder = node("guest", files["site_0"], "--auth-key", str(certs / "nodes" / "intruder.key"))
            fooled = node("guest", files["site_1"], "--auth-key", str(certs / "nodes" / "site_1.key"),
                          "--root-certificates", str(other / "ca.crt"), port=9095)
            broken = node("guest", bad, "--auth-key", str(certs / "nodes" / "site_0.key"), port=9096)
            for site in sites:
                site.wait_for("node joined the SuperLink", timeout=120)
            phase("four nodes joined")

            # Act: the flow runs in the root namespace and reaches the SuperLink over the bridge, over TLS
            config = {"data": {"dataset": "digits", "partitioning": "iid", "central_test_fraction": CENTRAL_TEST},
                      "rounds": 2, "seed": SEED, "assignment": "by-tier", "arm_retries": 0,
                      "large": {"model": "mlp", "local_epochs": 2, "batch_size": 32, "learning_rate": 3e-3,
                                "round_timeout_s": 120},
                      "small": {"model": "logreg", "local_epochs": 1, "batch_size": 32, "learning_rate": 1e-2,
                                "round_timeout_s": 120},
                      "superlink": f"{link_ip}:{PORT}", "store_uri": f"file://{tmp_path / 'store'}"}
            flow_env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "FEDCOMPARE_STATE_DIR": str(tmp_path / "state" / "flow"),
                        "FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES": str(certs / "ca.crt")}
            run_key = _run_flow(config, flow_env, timeout=420)
            phase("flow run completed")
            refusals = {name: _one_line_refusal(proc) for name, proc in
                        (("intruder", intruder), ("fooled", fooled), ("broken", broken))}

            # the guide's way to add a node to a running SuperLink: register its key, start it again
            control = ["--superlink", f"{link_ip}:{PORT}", "--root-certificates", str(certs / "ca.crt")]
            added = _cli("node", "register", str(certs / "nodes" / "intruder.pub"), *control)
            late = node("guest", files["site_0"], "--auth-key", str(certs / "nodes" / "intruder.key"), port=9097)
            late.wait_for("node joined the SuperLink", timeout=120)
            node_id = re.fullmatch(r"registered node intruder \(Flower node id (\d+)\)\n", added).group(1)
            removed = _cli("node", "unregister", node_id, *control)
            phase("a fifth node registered, joined and unregistered")
        finally:
            for proc in reversed(running):
                proc.stop()
            phase("everything stopped")
            print("\n".join(f"--- {p.name}\n{p.output[-1500:]}" for p in running))
            print("\n".join(phases))

    # Assert: both arms trained on the nodes of their tier, each node on its own file; the others were refused
    from infra.checkpoints import report_key
    from infra.store import open_store

    report = open_store(f"file://{tmp_path / 'store'}").get_json(report_key(run_key))
    nodes = report["federation"]["nodes"]
    assert len(nodes) == len(SITES) and all(n["data-source"] == "node-file" for n in nodes)
    assert sorted(n["tier"] for n in nodes) == ["cpu", "cpu", "gpu", "gpu"]
    tiers = {n["node_id"]: n["tier"] for n in nodes}
    for arm, tier in (("large", "gpu"), ("small", "cpu")):
        summary = report["arms"][arm]
        assert summary["rounds"] == 2 and 0.2 < summary["final_accuracy"] <= 1.0, summary  # chance: 0.1
        assert sorted(tiers[n] for n in summary["nodes"]) == [tier, tier]
    assert "its public key is not registered" in refusals["intruder"]
    assert "--root-certificates did not sign the SuperLink's certificate" in refusals["fooled"]
    assert str(bad) in refusals["broken"] and "no label column 'label'" in refusals["broken"]
    assert broken.output.strip().count("\n") == 0  # bad data: refused before Flower starts, in one line
    assert f"node joined the SuperLink at {link_ip}:{PORT} as Flower node {node_id}\n" in late.output
    assert removed == f"unregistered Flower node {node_id}: the SuperLink refuses its key from now on\n"
    assert all(n.process.returncode == 0 for n in (*sites, late)) and link.process.returncode == 0
