"""Public home of the Hugging Face Trainer / TRL integration: `fastsel.hf.SelectiveTrainer`, `make_selective`, ...

The code lives in `fastsel.integrations.hf`; this module re-exports its public names.
"""

from fastsel.integrations.hf import *  # noqa: F403
from fastsel.integrations.hf import __all__  # noqa: F401
