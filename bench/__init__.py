"""Benchmark suite: `python -m bench` times qkernels' recipes against the baselines users would pick.

Modules: `device` (hardware detection, peak table, CPU probe), `timing` (warm-up and samples),
`cases` / `torch_cases` / `jax_cases` (what each row runs), `runner` (metrics per row),
`targets` (speed goals from the kernel issues), `report` (markdown, JSON, plot), `schema` (JSON Schema).
"""
