"""Layer 3, mergekit: the ``cpi`` merge method and its registration, the global
pre-pass, and validated, atomic recipe runs (``cpift merge``).

* ``method``   the mergekit method ``cpi`` and its registration
* ``config``   where ``cpi`` parameters may stand in a recipe
* ``prepass``  the global-scope pre-pass, cached, run in a child process (import-light)
* ``recipe``   ``cpift merge``: validate a recipe, run it atomically
* ``graft``    the graft test's models: a core grafted onto theta_0, or removed from its fine-tune
"""
