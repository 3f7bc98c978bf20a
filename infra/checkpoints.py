"""Round checkpoints and their manifest, on top of any Store.

Layout (identical on every backend)::

    runs/<run_key>/<arm>/round-0001/model.npz        the global model's named arrays
    runs/<run_key>/<arm>/round-0001/metrics.json     the round's metrics
    runs/<run_key>/<arm>/round-0001/checkpoint.json  what the round is: model, config, privacy, code versions
    runs/<run_key>/<arm>/manifest.json               sha256, xxh3-128, size of every object, written last

The manifest is the commit point: a round exists once the manifest lists it, so a crash
between objects and manifest leaves the previous round as the latest good one. Every
read checks an object's size and digest against the manifest: xxh3-128 where the entry
has it, else sha256 (rounds written before xxh3-128 was recorded). sha256 stays the
object's identity (the resume checks compare it); reads verify xxh3-128 because sha256
costs as much CPU as the download itself, and a cryptographic digest buys nothing here:
the manifest lives in the same store unsigned, so whoever can rewrite an object can
rewrite its entry too, while accidental corruption slips past a 128-bit check with
probability 2**-128. A model is never held twice in
memory: it is serialized into a temp file while hashed (memory up to 16 MiB, then
TMPDIR) and uploaded from there; on reading, its bytes are hashed and decoded straight
into the arrays as they arrive, and the arrays are returned only if the hash matches.
Retention (``keep_last``) deletes old models but keeps every round's metrics and
checkpoint.json; ``load_latest_good`` and ``rewind`` let a resumed arm skip and re-train
rounds whose objects are damaged.

Writing lives in ``infra._checkpoint_write``, reading in ``infra._checkpoint_read``, the key
layout, manifest, .npz encoding, retention and provenance in the other ``infra._*`` modules;
this module is their public home.
"""

from __future__ import annotations

from infra._checkpoint_read import (
    GoodRound, SkippedRound, load_latest, load_latest_good, load_model, load_round, read_checkpoint, round_metrics,
)
from infra._checkpoint_write import rewind, write_round
from infra._layout import config_hash, federation_key, plot_key, report_key, round_prefix
from infra._manifest import FORMAT_VERSION, read_manifest
from infra._npz import arrays_to_npz_bytes, npz_bytes_to_arrays
from infra._provenance import Source, checkout_source, run_source
from infra._verified import CheckpointError

__all__ = [
    "CheckpointError", "FORMAT_VERSION", "GoodRound", "SkippedRound", "Source", "arrays_to_npz_bytes",
    "checkout_source", "config_hash", "federation_key", "load_latest", "load_latest_good", "load_model", "load_round",
    "npz_bytes_to_arrays", "plot_key", "read_checkpoint", "read_manifest", "report_key", "rewind", "round_metrics",
    "round_prefix", "run_source", "write_round",
]
