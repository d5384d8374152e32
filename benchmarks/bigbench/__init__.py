"""The real-task plug-and-play benchmark on BIG-bench tasks (issue in progress): the task data, read offline from the
`bigbench` sdist, and the fixed splits (`data.py`); see docs/bigbench_benchmark.md for what is built so far."""
