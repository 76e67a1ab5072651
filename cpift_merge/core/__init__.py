"""Layer 1, pure tensor math: torch (and Numba, optionally), no file I/O, no mergekit, no transformers.

* ``topk``    a task's core: exact top-k of ``|delta|`` over a stream of tensors, the tie rule
* ``groups``  Jaccard overlap of cores, connected groups, stage order
* ``localization``  how much of a task's update its core holds (shares of ‖Δ‖₁, ‖Δ‖₂²)
* ``masks``   1-bit / sparse mask encoding
* ``fusion``  CPI fusion of one tensor (transplant + masked SLERP)
* ``fused``   its first pass and SLERP as fused CPU loops (``fused_loops``, Numba; optional)
"""
