"""Task heads over the shared encoder (each task kind in ``finetune.tasks`` names the head it builds)."""

from finetune.heads.change import SiameseChange, SiameseUperNet
from finetune.heads.classifier import SceneClassifier
from finetune.heads.fusion import FusionDecoder
from finetune.heads.spectral import HyperIn, HyperLinear
from finetune.heads.upernet import UperNet

__all__ = ["FusionDecoder", "HyperIn", "HyperLinear", "SceneClassifier", "SiameseChange", "SiameseUperNet", "UperNet"]
