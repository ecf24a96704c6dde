"""The frozen base: loading components from a diffusers folder, fewer-bit storage (fp8, nf4), fp8 matmuls,
the frozen linear layers, block swap, published shapes and the parts tiny models are built from."""

from qflux.weights.block_swap import swap_blocks
from qflux.weights.loading import load_part
from qflux.weights.quantize import quantize_frozen

__all__ = ["load_part", "quantize_frozen", "swap_blocks"]
