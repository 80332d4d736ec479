"""The engine: many sequences over one model. `batch.py` (what a backend takes), `backend.py` (what the engine asks
of a backend), `sequence.py` (one request), `scheduler.py` (who runs each step), `core.py` (the step, and the thread
that owns it)."""

DEFAULT_BATCH = 256     # tokens per engine step: bounds the activations' memory, keeps the GEMM tiles full
DEFAULT_PARALLEL = 16   # sequences running at once (llama-server's --parallel, vLLM's max_num_seqs)
MAX_PARALLEL = 1024     # more sequences at once than any CPU serves usefully (each costs scheduler and window blocks)
MAX_BATCH = 8192        # tokens per step: the C core's activations are sized for it (llama.cpp's n_batch default: 2048)
