"""ServerApp and ClientApp of the bare floor: one train message per node per round, arrays echoed back."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received arrays unchanged."""
    return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds over every connected node and write each round's wall seconds to `out`."""
    rounds, out = int(context.run_config["rounds"]), str(context.run_config["out"])
    arrays = ArrayRecord([np.zeros(1000, dtype=np.float32)])
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    walls = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                            message_type="train", dst_node_id=node) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=600))
        walls.append(time.perf_counter() - started)
        assert all(not reply.has_error() for reply in replies), [r.error for r in replies if r.has_error()]
    if out:
        with open(out, "w") as file:
            json.dump({"nodes": len(nodes), "round_wall_s": walls}, file)
