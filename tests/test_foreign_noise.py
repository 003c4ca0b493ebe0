"""`import fastsel` silences exactly two foreign messages (bitsandbytes' hub-kernel notice, peft's use of a
deprecated transformers name) and nothing else of those packages."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
from needs import need_module

import fastsel  # noqa: F401  (the import installs the filters)
from fastsel import foreign_noise


def test_bitsandbytes_hub_notice_dropped_other_records_kept(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(foreign_noise.BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=foreign_noise.BNB_CPU_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no hub")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_only_the_deprecated_checkpointing_name_is_ignored() -> None:
    foreign_noise.silence()  # idempotent
    assert len(logging.getLogger(foreign_noise.BNB_CPU_LOGGER).filters) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        foreign_noise.silence()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated"]


def test_installed_bitsandbytes_is_quiet_on_import(capfd: pytest.CaptureFixture[str]) -> None:
    """peft imports bitsandbytes; after `import fastsel` nothing of its hub notice reaches stderr."""
    need_module("bitsandbytes")
    code = "import fastsel, logging; logging.basicConfig(); import peft, bitsandbytes; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels-community" not in result.stderr
