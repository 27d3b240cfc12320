"""Maintainer tools, apart from the pipeline library: run from the repository root as ``python -m tools.<name>``.

release
    a training checkpoint -> the shipped model (``models/rnnc-cpu.pt``, fp16 weights) and its JSON record
"""
