"""MorphMLP on Ray: the paper's video backbone, its data path, training, search and evaluation.

`import morphmlp` stays light (torch only): Ray, PyAV and MLflow load when a job needs them.
"""

import os
import sys

# The data pipeline starts its decode actors with this variable set (data/pipeline.py). They never
# compile, yet torchvision imports torch._dynamo, which imports triton whenever it is installed:
# about 75 MiB resident in every actor. In them torch finds no triton, as on a machine without it.
# This must run before torchvision loads, and every import of the library passes through here.
DECODE_ACTOR_ENV = "MORPHMLP_DECODE_ACTOR"
if os.environ.get(DECODE_ACTOR_ENV) == "1":
    sys.modules.setdefault("triton", None)  # None: `import triton` raises ImportError

from morphmlp.models import create_model, list_models  # noqa: E402

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
