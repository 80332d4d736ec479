"""The Ray Serve request router of the replicas (replicas.py): a module of its own, imported by Ray Serve by name in
every process that routes to them; it imports Ray."""

from __future__ import annotations

from ray.serve.request_router import RequestRouter

from .replicas import choose


class PrefixRouter(RequestRouter):
    """The request's key (the hash of its prompt's first KV block, from the Router) goes to its home replica unless
    that one is loaded well past the others (`replicas.choose`); requests without a key to the least loaded."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("prefix_key") if pending_request is not None else None
        if key is None:
            return [list(candidate_replicas)]   # probed, and the least loaded taken
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        return [[by_id[rid]] for rid in choose(key, loads)]
