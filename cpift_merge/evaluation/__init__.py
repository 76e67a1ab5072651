"""Layer 4, evaluation: the built-in tasks and their exact checkers, batched greedy
scoring of a model.

* ``tasks``    built-in tasks (math, code, logic, format): seeded generators, checkers
* ``scoring``  batched greedy generation scored by a metric
"""
