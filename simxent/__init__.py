"""simxent: SimCLR-style contrastive self-supervised learning on image folders."""
__version__ = "0.1.0"

from .checkpoint import export_torchvision, load_encoder  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .loss import nt_xent  # noqa: E402

__all__ = ["Config", "export_torchvision", "load_config", "load_encoder", "nt_xent", "__version__"]
