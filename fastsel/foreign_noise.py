"""Two messages of packages fastsel installs, silenced at their source (the only thing `import fastsel` does
besides defining names), so that `make demo` and a user's first run show fastsel's own output:

- bitsandbytes (the `qlora` extra, imported by peft) logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" on AVX512-BF16 CPUs whenever Hugging Face's `kernels` hub cannot be reached; its own
  fallback kernel is then used, so nothing is lost. Dropped by a filter on that one logger, for that one message.
- transformers 5 deprecates `is_gradient_checkpointing`, which peft still reads on every `get_peft_model`
  (a FutureWarning addressed to peft's authors, not to the user). Ignored for that message only.

Every other warning of these packages still shows.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_HUB_MESSAGE)


def silence() -> None:
    """Install the two filters (idempotent)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _not_the_hub_kernel_notice not in logger.filters:
        logger.addFilter(_not_the_hub_kernel_notice)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
