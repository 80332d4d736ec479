"""Tensor parallelism: each layer's heads and FFN channels split over N ranks (`shard.py`: the split and a rank's
weights; `tensor.py`: the ranks as processes, their all-reduces, and the backend the engine drives)."""
