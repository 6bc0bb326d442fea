"""mochi_hub: MoCHi hard negative mixing for MoCo, as a timm/torchvision model-hub plugin."""

__version__ = "0.1.0"

from mochi_hub.mixing import mochi_logits  # noqa: E402

__all__ = ["__version__", "mochi_logits"]
