"""The GPU benchmark (``python -m moe_colab bench``): Mixtral-8x7B's shapes, synthetic weights.

    run.py        the rows (full, no_prefetch, no_cache, naive, full_swap) and the command line
    synthetic.py  low-bit experts and trunk generated on the device, assembled by build_engine
    replay.py     routing traces replayed as the engine's routing and guessing strategies
    naive.py      accelerate's offloading of the same bytes, the paper's baseline
    measure.py    bandwidth, timed decode, one row, profiles
    report.py     benchmarks.md / .json / .svg, written only with --out
"""
