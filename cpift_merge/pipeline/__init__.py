"""Layer 5, the pipeline: ``cpift run`` (probes, regions, staged SFT, the cpi merge,
calibration, baselines, evaluation), its report and plots, model preparation and the
merge demo.

* ``config``  the pipeline file: validated settings, the embedded default (``default.yml``)
* ``steps``   fingerprinted, resumable steps
* ``run``     the run: every method, results
* ``report``  text and Markdown tables (Table 1, Table 2, region summary)
* ``plots``   region and score plots
* ``models``  SmolLM2-135M-Instruct from its GGUF; seeded task variants
* ``demo``    ``cpift merge-demo``
"""
