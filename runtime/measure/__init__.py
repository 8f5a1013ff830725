"""Measuring the runtime's own layers: per-layer latency profiles and the activation hop,
calibration statistics and perplexity, both a range of layers at a time. Imports
``runtime.model``, ``runtime.quant`` and ``runtime.errors``; never serving code.
"""
