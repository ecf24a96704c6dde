"""Console hygiene for recipes: hide warnings that are known to be harmless here."""

from __future__ import annotations

import logging

# transformers 5 warns once per image-processor class that torchvision is missing and that it
# falls back to the PIL implementation; qflux never uses torchvision, so the fallback is intended.
# torchao (the fp8 extra) logs that its CUDA-only kernels do not load on a CPU build, diffusers
# repeats it, and torch notes that torchao registers enums the old way: all harmless on import.
_HARMLESS = (
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    ("torchao", "Failed to load"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    ("torch.utils._pytree", "is an Enum subclass"),
    # bitsandbytes on AVX-512 BF16 CPUs tries the optional `kernels` package for its 4-bit CPU GEMM
    # and falls back to its own kernel: a line on every command that is not a problem
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropContaining(logging.Filter):
    """Drops records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_warnings() -> None:
    """Attach a filter for each record listed in ``_HARMLESS`` (idempotent)."""
    for name, text in _HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
