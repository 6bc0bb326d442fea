"""mochi_hub: MoCHi hard negative mixing for MoCo, as a timm/torchvision model-hub plugin."""

__version__ = "0.1.0"

from mochi_hub.mixing import mochi_logits  # noqa: E402
from mochi_hub.registry import hub_org, set_hub_org  # noqa: E402  (registers timm entrypoints)

__all__ = ["__version__", "hub_org", "mochi_logits", "set_hub_org"]
