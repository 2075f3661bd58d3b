"""MorphMLP on Ray: the paper's video backbone, its data path, training, search and evaluation.

`import morphmlp` stays light (torch only): Ray, PyAV and MLflow load when a job needs them.
"""

from morphmlp.models import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
