"""Which nodes train which arm: by tier and by what each node's memory can hold (no Prefect, no Flower)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A CUDA context, cuDNN workspaces and allocator slack come on top of the tensors a training
# step holds (clients/_memory.py counts tensors only); a host process adds the torch runtime.
CUDA_OVERHEAD_MB = 600.0
HOST_OVERHEAD_MB = 400.0


@dataclass(frozen=True)
class Assignment:
    """The nodes of each arm and, per node left out of an arm, why."""

    nodes: dict[str, list[int]]  # arm ("large", "small") -> node ids
    left_out: dict[int, str] = field(default_factory=dict)  # node id -> reason it does not train the large arm


def memory_fit(node: dict[str, Any], need_bytes: int) -> str:
    """Return why ``node`` cannot hold a training step of ``need_bytes`` tensor bytes; "" if it can.

    A node computing on CUDA is judged by its GPU memory, any other by the host memory it
    reported available; a node that reported neither (an older ClientApp) is trusted.
    """
    if need_bytes <= 0:
        return ""
    on_gpu = str(node.get("device", "cpu")).startswith("cuda")
    have = node.get("gpu-memory-mb") if on_gpu else node.get("memory-mb")
    if have is None or float(have) < 0:
        return ""
    need = need_bytes / 2**20 + (CUDA_OVERHEAD_MB if on_gpu else HOST_OVERHEAD_MB)
    if float(have) >= need:
        return ""
    where = "available host memory" if not on_gpu else f"{node.get('gpu-name') or 'GPU'} memory"
    return f"needs about {need:.0f} MB for the large model and a batch, its {where} is {float(have):.0f} MB"


def assign_nodes(nodes: list[dict[str, Any]], assignment: str, *, large_need_bytes: int = 0,
                 small_on_gpu_nodes: bool = False) -> Assignment:
    """Give each arm its nodes: by tier (large on gpu nodes that can hold it, small on cpu) or every node to both.

    Raises ValueError when an arm would get no node, naming what to change.
    """
    if assignment == "all-nodes":
        every = [n["node_id"] for n in nodes]
        return Assignment({"large": every, "small": every})
    left_out = {n["node_id"]: reason for n in nodes
                if n["tier"] == "gpu" and (reason := memory_fit(n, large_need_bytes))}
    gpu = [n["node_id"] for n in nodes if n["tier"] == "gpu"]
    chosen = {
        "large": [i for i in gpu if i not in left_out],
        "small": [n["node_id"] for n in nodes if n["tier"] == "cpu" or (small_on_gpu_nodes and n["tier"] == "gpu")],
    }
    if gpu and not chosen["large"]:
        raise ValueError(
            f"assignment 'by-tier': no gpu-tier node can hold the large model ({next(iter(left_out.values()))}): "
            "lower large.batch_size, pick a smaller large.model, or add a node with more memory"
        )
    for arm, tier in (("large", "gpu"), ("small", "cpu")):
        if not chosen[arm]:
            raise ValueError(
                f"assignment 'by-tier' needs at least one node of tier {tier!r} for the {arm} arm, "
                f"but the nodes have tiers {sorted({n['tier'] for n in nodes})}: start such a node "
                "or use assignment 'all-nodes'"
            )
    return Assignment(chosen, left_out)


def node_table(nodes: list[dict[str, Any]], assignment: Assignment) -> list[dict[str, Any]]:
    """Return one row per node for the flow's first artifact: what it is and which arms it trains (counts only)."""
    rows = []
    for n in nodes:
        node_id = n["node_id"]
        arms = [arm for arm, ids in assignment.nodes.items() if node_id in ids]
        own = n.get("data-source") == "node-file"
        rows.append({
            "node": str(node_id),
            "tier": n["tier"],
            "device": n["device"] + (f" ({n['gpu-name']}, {n['gpu-memory-mb']:.0f} MB)" if "gpu-name" in n else ""),
            "host memory available MB": round(float(n["memory-mb"])) if "memory-mb" in n else None,
            "data": n.get("data-id", "") if own else f"partition {n['partition-id']} of {n['num-partitions']}",
            "train examples": n["num-train"],
            "test examples": n["num-test"],
            "classes seen": n["classes-seen"],
            "arms": ", ".join(arms) or "none",
            "note": assignment.left_out.get(node_id, ""),
        })
    return rows
