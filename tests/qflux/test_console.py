"""Known-harmless warnings are dropped, and nothing else."""

from __future__ import annotations


def test_quiet_known_warnings_drops_only_the_torchvision_fallback(caplog) -> None:
    import logging

    from qflux.train.console import quiet_known_warnings

    quiet_known_warnings()
    quiet_known_warnings()
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning("`X` requires torchvision (not installed); falling back")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_bitsandbytes_kernels_fallback_is_quiet_and_its_errors_are_not(caplog) -> None:
    import logging

    from qflux.train.console import quiet_known_warnings

    quiet_known_warnings()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.error("a real error")
    assert [r.getMessage() for r in caplog.records] == ["a real error"]
