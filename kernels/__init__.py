"""Triton kernels of xal-engine, installed as ``xal_engine.kernels``.

Import only as ``xal_engine.kernels``: the top-level name ``kernels`` belongs to an unrelated PyPI package.
"""
