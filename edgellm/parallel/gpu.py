"""How tensor-parallel ranks on GPUs hand each other their partial sums (the GPU backend's `comm`).

Every rank needs the sum of all ranks' partial sums of a block half. Rather than an all-reduce, whose order of
additions depends on how the collective chunks the buffer (so on the batch's size, with more than two ranks), the
ranks all-gather their partials and each adds them in rank order (kernels.cu's `reduce_parts`): the same bits on
every rank and for every batch, as the kernels' own sums. The partials are n_tokens x n_embd floats, small next
to the weights each rank reads.

    NcclGather   one GPU per rank: NCCL's all-gather on the step's stream (captured into the step's CUDA graph).
    HostGather   ranks sharing a GPU (NCCL refuses two ranks on one device): each rank's partials go through the
                 host and gloo's all-gather; the same kernel adds them. Slow (a host round trip per block half,
                 no graphs): it runs the split on one GPU, e.g. to check it against the unsplit backend.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError

COMMS = ("nccl", "host")


class NcclGather:
    captured = True
    name = "NCCL"

    def __init__(self, n_ranks: int, rank: int, unique_id):
        from cupy.cuda import nccl

        if not getattr(nccl, "available", True):
            raise EdgeLLMError("this CuPy has no NCCL (pip install nvidia-nccl-cu12 or -cu13, as CuPy's CUDA)")
        self.n_ranks, self._nccl = n_ranks, nccl
        self.comm = nccl.NcclCommunicator(n_ranks, unique_id, rank)

    @staticmethod
    def unique_id():
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    def all_gather(self, src, dst, count: int, stream) -> None:
        """dst[r * count:(r + 1) * count] = rank r's src[:count], on `stream`."""
        self.comm.allGather(src.data.ptr, dst.data.ptr, count, self._nccl.NCCL_FLOAT32, stream.ptr)


class HostGather:
    captured = False
    name = "the host (gloo)"

    def __init__(self, n_ranks: int, dist=None, torch=None):
        if n_ranks > 1 and dist is None:
            raise EdgeLLMError("ranks sharing a GPU need torch.distributed to meet")
        self.n_ranks, self._dist, self._torch = n_ranks, dist, torch

    def all_gather(self, src, dst, count: int, stream) -> None:
        mine = np.empty(count, np.float32)
        src.reshape(-1)[:count].get(stream=stream, out=mine)
        stream.synchronize()
        if self.n_ranks > 1:
            parts = [self._torch.empty(count, dtype=self._torch.float32) for _ in range(self.n_ranks)]
            self._dist.all_gather(parts, self._torch.from_numpy(mine))
            mine = np.concatenate([p.numpy() for p in parts])
        dst[:self.n_ranks * count].set(mine, stream=stream)
        stream.synchronize()   # `mine` may go before the copy is done otherwise


def devices(base: int, n_ranks: int, n_devices: int) -> list[int]:
    """The GPU of each rank: base, base + 1, ... wrapping around the devices there are."""
    if n_devices < 1:
        raise EdgeLLMError("no CUDA GPU found")
    if not 0 <= base < n_devices:
        raise EdgeLLMError(f"GPU {base} does not exist (this machine has {n_devices})")
    return [(base + r) % n_devices for r in range(n_ranks)]


def choose(n_ranks: int, n_devices: int, asked: str | None) -> str | None:
    """The comm for n_ranks ranks over n_devices GPUs: NCCL when each rank has a GPU of its own, else the host;
    none for one rank unless asked (a communicator of one still runs NCCL's calls, e.g. to test them)."""
    if asked is not None and asked not in COMMS:
        raise EdgeLLMError(f"unknown tensor-parallel comm {asked!r}; expected one of {', '.join(COMMS)}")
    if asked == "nccl" and n_devices < n_ranks:
        raise EdgeLLMError(f"NCCL needs a GPU per rank: {n_ranks} ranks, {n_devices} GPU(s)")
    if asked is not None:
        return asked
    if n_ranks == 1:
        return None
    return "nccl" if n_devices >= n_ranks else "host"
