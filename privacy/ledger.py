"""A node's privacy ledger: every DP-SGD round it trained, across rounds, arms and runs, with budgets.

The ledger is a JSON file on the node (``node-config privacy-ledger``); a virtual node of a
simulation keeps it in the run's store (:class:`StoreLedger`). Before a round
trains, :meth:`PrivacyLedger.charge` composes the round with what the node already
spent and refuses — raising :class:`BudgetExceeded` — when that would exceed

* the run's target ε for this arm (over the rounds of this run and arm), or
* the node's own lifetime budget (``node-config privacy-budget``), over every entry:
  all runs and arms that trained on this node's data.

A round is charged before it trains: an update that is computed is counted even if it
never reaches the server (a crash after training spends privacy too). Concurrent
arms on one node serialize on an ``fcntl`` lock; the file is replaced atomically.

No Flower or Prefect import.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from privacy.accounting import EPSILON_TOLERANCE, Mechanism, Plan, epsilon

LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """Training the next round would spend more ε than a budget allows."""


class PrivacyLedger:
    """The privacy spent on one node's data, kept in ``path``."""

    def __init__(self, path: str | Path, *, budget_epsilon: float | None = None) -> None:
        """Open the ledger at ``path`` (created on first charge) with an optional lifetime ε budget."""
        self.path = Path(path)
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"node privacy budget must be a positive ε, got {budget_epsilon}")
        self.budget_epsilon = budget_epsilon

    def entries(self) -> list[dict]:
        """Return every charged round."""
        text = self._read()
        if text is None:
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"privacy ledger {self.path} is unreadable ({exc}); restore it from a backup — "
                             "deleting it would forget privacy already spent") from None
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"privacy ledger {self.path} has version {data.get('version')}, expected {LEDGER_VERSION}")
        return list(data["entries"])

    def _read(self) -> str | None:
        """Return the ledger's text, or None when nothing was charged yet."""
        if not self.path.exists():
            return None
        try:
            return self.path.read_text()
        except OSError as exc:
            raise ValueError(f"privacy ledger {self.path} is unreadable ({exc}); restore it from a backup — "
                             "deleting it would forget privacy already spent") from None

    def spent(self, *, delta: float, accountant: str, run_key: str | None = None, arm: str | None = None) -> float:
        """Return the ε composed over the entries (of one run and arm when given) at ``delta``."""
        chosen = [e for e in self.entries()
                  if (run_key is None or e["run_key"] == run_key) and (arm is None or e["arm"] == arm)]
        return epsilon([_mechanism(e) for e in chosen], delta=delta, accountant=accountant)

    def charge(self, plan: Plan, *, run_key: str, arm: str, server_round: int,
               message_id: str = "") -> dict[str, float]:
        """Record that this node trains ``server_round`` under ``plan``; return the ε spent after it.

        ``message_id`` names the server's training message: when the node answers the same message
        again (its warm worker died mid-round and the message is retried), the round is not charged
        a second time, since only one of the tries releases an update. "" charges every call.

        Returns ``{"epsilon_run": ..., "epsilon_node": ...}``: this run and arm's ε, and
        the node's ε over every entry, both at the plan's δ.

        Raises:
            BudgetExceeded: the round would take this run and arm above its target ε, or
                the node above its lifetime budget; nothing is recorded then.
        """
        with self._locked():
            entries = self.entries()
            if message_id and any(e.get("message_id") == message_id for e in entries):
                return self._spent_after(entries, plan, run_key=run_key, arm=arm)
            new = {"run_key": run_key, "arm": arm, "round": server_round, "accountant": plan.accountant,
                   "delta": plan.delta, **plan.round_mechanism().__dict__,
                   "charged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   **({"message_id": message_id} if message_id else {})}
            run_entries = [e for e in entries if e["run_key"] == run_key and e["arm"] == arm] + [new]
            run_eps = epsilon([_mechanism(e) for e in run_entries], delta=plan.delta, accountant=plan.accountant)
            node_eps = epsilon([_mechanism(e) for e in entries + [new]], delta=plan.delta,
                               accountant=plan.accountant)
            if run_eps > plan.target_epsilon + EPSILON_TOLERANCE:
                raise BudgetExceeded(
                    f"privacy budget exhausted: round {server_round} would take the {arm} arm of run {run_key} "
                    f"to ε={run_eps:.3f} on this node, above its target {plan.target_epsilon} "
                    f"({len(run_entries) - 1} rounds already charged); the node sits this round out"
                )
            if self.budget_epsilon is not None and node_eps > self.budget_epsilon:
                raise BudgetExceeded(
                    f"privacy budget exhausted: round {server_round} would take this node's data to "
                    f"ε={node_eps:.3f} over all runs, above its budget {self.budget_epsilon} "
                    f"(privacy-budget in the node config); the node sits this round out"
                )
            self._write(entries + [new])
        return {"epsilon_run": run_eps, "epsilon_node": node_eps}

    @staticmethod
    def _spent_after(entries: list[dict], plan: Plan, *, run_key: str, arm: str) -> dict[str, float]:
        """Return the ε of this run and arm and of the node over ``entries``, at the plan's δ."""
        run_entries = [e for e in entries if e["run_key"] == run_key and e["arm"] == arm]
        return {"epsilon_run": epsilon([_mechanism(e) for e in run_entries], delta=plan.delta,
                                       accountant=plan.accountant),
                "epsilon_node": epsilon([_mechanism(e) for e in entries], delta=plan.delta,
                                        accountant=plan.accountant)}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the ledger (a sidecar lock file) inside the block."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: list[dict]) -> None:
        """Replace the ledger atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"version": LEDGER_VERSION, "entries": entries}, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class StoreLedger(PrivacyLedger):
    """The ledger of a virtual node of Flower's Simulation Engine, kept as one JSON object in the run's store.

    A virtual node has no disk of its own (its Ray actor may run on any host of a cluster).
    Flower sends a node one message at a time and the flow runs a simulation's arms one after
    the other, so no two charges of one virtual node overlap: no lock is taken. ``store``:
    an ``infra.store.Store`` (its put_bytes / get_bytes / exists).
    """

    def __init__(self, store, key: str, *, budget_epsilon: float | None = None) -> None:
        super().__init__(f"{store.uri.rstrip('/')}/{key}", budget_epsilon=budget_epsilon)
        self.store, self.key = store, key

    def _read(self) -> str | None:
        """Return the ledger object's text, or None when nothing was charged yet."""
        if not self.store.exists(self.key):
            return None
        return self.store.get_bytes(self.key).decode()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Nothing to lock: the charges of one virtual node never overlap (see the class docstring)."""
        yield

    def _write(self, entries: list[dict]) -> None:
        """Replace the ledger object (a store write replaces a whole object)."""
        self.store.put_bytes(self.key, json.dumps({"version": LEDGER_VERSION, "entries": entries}, indent=1).encode())


def _mechanism(entry: dict) -> Mechanism:
    """Return the accountant inputs of a ledger entry."""
    return Mechanism(float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"]))
