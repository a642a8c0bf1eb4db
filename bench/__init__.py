"""Benchmarks of a whole broker with real adapter processes: ``python -m bench``.

Each scenario is a module with a ``run(options) -> Result`` function, registered in
:data:`bench.__main__.SCENARIOS`. ``python -m bench`` runs them and prints one table each;
``--write`` also rewrites each scenario's section of ``docs/benchmarks.md``; ``--smoke`` makes a
few calls only (for CI: it checks the benchmark still runs, not how fast anything is).
"""
