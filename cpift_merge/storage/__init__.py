"""Layer 2, what lives on disk: checkpoints read one tensor at a time, region
directories (compute, write, load), atomic output folders and file stamps.

* ``files``       atomic output folders, file stamps, the cache folder (no torch)
* ``checkpoint``  streaming reads of safetensors checkpoints, model fingerprints
* ``regions``     region directories: compute, write, load
"""
