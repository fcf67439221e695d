"""simxent: SimCLR-style contrastive self-supervised learning on image folders.

The Python API (README, "Python"): build a :class:`Config` (or :func:`load_config` a YAML file or preset
with overrides), :func:`pretrain` it on a folder, a list file or a Dataset, and use the encoder
(:func:`load_encoder`, :func:`export_torchvision`, :func:`linear_eval`, :func:`embed`; a searchable folder:
:func:`embed_folder`, :func:`read_store`, :func:`search_files`); :class:`ViewAugment` and
:func:`nt_xent` are the two views and the loss of a training step.

``simxent.linear_eval`` is the function; its module is reached by ``from simxent.linear_eval import ...``.
"""
__version__ = "0.1.0"

from .augment import ViewAugment  # noqa: E402
from .checkpoint import export_torchvision, load_encoder  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .linear_eval import ProbeOptions, linear_eval  # noqa: E402
from .loss import nt_xent  # noqa: E402
from .search import EmbedOptions, embed, embed_folder, read_store, search_files  # noqa: E402
from .train import pretrain  # noqa: E402

__all__ = ["Config", "EmbedOptions", "ProbeOptions", "ViewAugment", "embed", "embed_folder", "export_torchvision",
           "linear_eval", "load_config", "load_encoder", "nt_xent", "pretrain", "read_store", "search_files",
           "__version__"]
