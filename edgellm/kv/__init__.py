"""Paged KV memory: the physical pool (`paged.KVPool`), a sequence's view of it (`paged.SeqKV`), and the block
manager that hands blocks out, shares full blocks between sequences with the same token history and evicts
unreferenced ones (`blocks.BlockManager`)."""
