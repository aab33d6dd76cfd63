"""halfbyte: sharded data-parallel LLM training with 4-bit communication.

Layers (imports point down only): quant -> comm -> engine -> train -> bench.
"""

__version__ = "0.1.0"
