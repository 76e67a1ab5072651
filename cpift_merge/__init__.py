"""cpift-merge: Core Parameter Isolation for mergekit.

Kept import-light on purpose (no torch, no mergekit here): the autoload hook imports
this package inside other programs. The code is laid out in layers, one folder each;
a folder imports only from the folders below it (``lint-imports`` checks it):

* ``cpift_merge.core``        pure tensor math: exact top-k cores, Jaccard, groups, masks, fusion
* ``cpift_merge.storage``     checkpoints read tensor by tensor, region directories, atomic outputs
* ``cpift_merge.mergekit``    the mergekit method ``cpi``, its global pre-pass, ``cpift merge``
* ``cpift_merge.training``    the masked update, SFT data, probes and staged training
* ``cpift_merge.evaluation``  built-in tasks and their checkers, batched scoring
* ``cpift_merge.pipeline``    ``cpift run``: steps, methods, report, plots, the demos
* ``cpift_merge.cli``         the ``cpift`` command, thin
* ``cpift_merge.errors``      ``CpiftError``, the one-line error every layer raises
"""

__version__ = "0.1.0"
