"""Seeds that make every sampled trace reproducible wherever and whenever its shard runs."""

from __future__ import annotations

import hashlib


def sample_seed(base_seed: int, round_index: int, item_id: str, sample_index: int) -> int:
    """A stable seed: the same trace is drawn wherever and whenever its shard runs. The sample stage
    asks for an item's n traces in one request seeded with sample index 0; vLLM seeds its trace j
    with that seed + j, which each trace's lineage records."""
    key = f"{base_seed}/{round_index}/{item_id}/{sample_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF
