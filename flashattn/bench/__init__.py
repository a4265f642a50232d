"""The benchmark suite: `python -m flashattn.bench --help`.

Modules: cases (what is measured), peers (the implementations), measure (timing, peak memory),
suite (the run loop), report (tables, bench.json, summary.md), plots (PNG figures).
"""
