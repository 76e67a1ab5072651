"""cpift-merge: Core Parameter Isolation for mergekit.

Kept import-light on purpose (no torch, no mergekit here): the autoload hook imports
this package inside other programs. Import the submodules you need:

* ``cpift_merge.core``      pure math: exact top-k cores, Jaccard, groups, stage order
* ``cpift_merge.masks``     1-bit / sparse mask encoding
* ``cpift_merge.fusion``    pure CPI fusion of one tensor (transplant + masked SLERP)
* ``cpift_merge.regions``   region directories: compute, write, load
* ``cpift_merge.method``    the mergekit method ``cpi`` and its registration
* ``cpift_merge.merge``     ``cpift merge``: validated, atomic mergekit runs
* ``cpift_merge.cli``       the ``cpift`` command
"""

__version__ = "0.1.0"
