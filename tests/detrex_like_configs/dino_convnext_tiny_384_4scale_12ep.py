"""As detrex's own DINO-ConvNeXt config: train.init_checkpoint is the raw official ConvNeXt file."""
from .common import model, train

train.init_checkpoint = "/path/to/convnext_tiny_22k_1k_384.pth"
