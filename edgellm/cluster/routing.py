"""The Ray Serve request router of the replicas (replicas.py): a module of its own, imported by Ray Serve by name in
every process that routes to them; it imports Ray."""

from __future__ import annotations

from collections import Counter

from ray.serve.request_router import RequestRouter

from .replicas import choose


class PrefixRouter(RequestRouter):
    """The request's key (the hash of its prompt's first KV block, from the Router) goes to its home replica unless
    that one is loaded well past the others (`replicas.choose`); requests without a key to the least loaded.

    Load is what this router has sent each replica and not yet seen finish, counted as it decides: requests that
    arrive together would all read the same (stale) queue lengths and pile onto one replica."""

    def initialize_state(self, **kwargs):
        self._load: Counter = Counter()      # replica id -> requests this router gave it, still running
        self._given: dict[str, str] = {}     # request id -> the replica it was given

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = pending_request.kwargs.get("prefix_key") if pending_request is not None else None
        order = choose(key, {rid: self._load[rid] for rid in by_id})
        if pending_request is not None:
            rid = pending_request.metadata.internal_request_id
            if rid not in self._given:   # a retry of the same request is not counted twice
                self._given[rid] = order[0]
                self._load[order[0]] += 1
        return [[by_id[rid]] for rid in order]

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        given = self._given.pop(internal_request_id, None)
        if given is not None:
            self._load[given] -= 1
            if self._load[given] <= 0:
                del self._load[given]
