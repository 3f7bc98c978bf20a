"""What every test module shares: the order `make test` hands modules to its workers, and the S3 and store fixtures.

Test ordering: `make test` runs two pytest-xdist workers (`-n 2 --dist loadfile`).

The fault module and the integration module each drive their own local stack for many
minutes, and much of that time is spent waiting (heartbeats, round timeouts, an outage
ridden out), not computing. `--dist loadfile` keeps each module (and its module-scoped
stack) on one worker; moving both modules to the front of the collection hands them to the
two workers first, so that they run side by side, then the simulation module (minutes of Ray
runs), and the short modules fill in behind.
(`--dist loadgroup` would say this with marks, but xdist 3.8 groups by rewriting a node id
attribute that pytest 9 no longer reads.) Without xdist the order changes nothing a test
relies on.

Fixtures of the store and checkpoint tests (tests/test_store*.py, tests/test_checkpoint*.py):
one moto S3 server per session, a fresh bucket per test, an empty store of each backend, and a
TCP proxy in front of the S3 server that a test stops to inject an outage. A module that
defines a fixture of the same name uses its own.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from infra.certs import create_certificates
from infra.store import Store, open_store
from tests.s3server import ACCESS, SECRET, running_s3_server
from tests.tcpproxy import TcpProxy

pytest.register_assert_rewrite("tests.store_helpers")  # its shared asserts explain a failure as a test's do

_FIRST = ("test_faults.py", "test_integration.py", "test_simulation.py")  # longest first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the stack modules to the front, in the order of _FIRST."""
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Run one moto S3 server for the session and yield its endpoint URL."""
    with running_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the FEDCOMPARE_S3_* environment at the test server and return a fresh bucket name."""
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("FEDCOMPARE_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("FEDCOMPARE_S3_SECRET_KEY", SECRET)
    monkeypatch.delenv("FEDCOMPARE_S3_SECURE", raising=False)
    monkeypatch.delenv("FEDCOMPARE_S3_REGION", raising=False)
    return f"fc-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Return an empty store of each backend (S3 with a prefix inside a fresh bucket)."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/team/fedcompare")


@pytest.fixture
def proxy(s3_server: str) -> Iterator[TcpProxy]:
    """Run a TCP proxy in front of the session's S3 server: stopping it injects an outage."""
    parts = urlsplit(s3_server)
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


@pytest.fixture
def proxied_env(proxy: TcpProxy, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point FEDCOMPARE_S3_ENDPOINT at the proxy and return a fresh bucket name."""
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", proxy.endpoint)
    return s3_env


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a SuperLink certificate for coord.example/10.0.0.1 and keys for nodes site_a and site_b."""
    out = tmp_path_factory.mktemp("certs")
    create_certificates(out, server_names=["coord.example"], server_ips=["10.0.0.1"], nodes=["site_a", "site_b"])
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train torch on one thread in the module, restoring the count after: on a shared, oversubscribed CPU the
    tiny batches of the text and distillation tests ran 10-20x the CPU time on two OpenMP threads."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
