"""The same model at ConvNeXt-Atto size with a narrow decoder (the suite's size), its weights relative
to the working directory as training opens them."""
from .common import model, train

model.backbone.depths = [2, 2, 6, 2]
model.backbone.dims = [40, 80, 160, 320]
model.embed_dim = 64
model.transformer.embed_dim = 64
model.num_queries = 100
train.init_checkpoint = "weights/convnext_atto_d2.pth"
