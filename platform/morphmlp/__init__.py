"""MorphMLP on Ray: the paper's video backbone, its data path, training, search and evaluation.

`import morphmlp` loads nothing heavy: the decode actors import the data modules through it and
never load torch. `morphmlp.create_model` and `morphmlp.list_models` load the model code on first
use.
"""

import os

# Ray Data reads its logging config when it is first imported, in every process: set here, before
# any job imports Ray (and inherited by the Ray processes a job starts), it keeps Ray Data's INFO
# lines off the console (ray_data_logging.yaml says which). A value the user set wins.
os.environ.setdefault(
    "RAY_DATA_LOGGING_CONFIG", os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
)

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from morphmlp import models

        return getattr(models, name)
    raise AttributeError(f"module 'morphmlp' has no attribute {name!r}")
