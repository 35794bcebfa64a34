"""Task heads over the shared encoder, built by name (``build_head``)."""

from finetune.heads.change import SiameseChange
from finetune.heads.classifier import SceneClassifier
from finetune.heads.fusion import FusionDecoder, HyperLinear
from finetune.heads.upernet import UperNet

HEADS = {"classification": SceneClassifier, "segmentation": UperNet, "change": SiameseChange,
         "fusion": FusionDecoder}


def build_head(kind: str, encoder, **kwargs):
    """The head of task ``kind`` (one of :data:`HEADS`) around ``encoder``."""
    try:
        cls = HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(HEADS)}") from None
    return cls(encoder, **kwargs)


__all__ = ["HEADS", "FusionDecoder", "HyperLinear", "SceneClassifier", "SiameseChange", "UperNet", "build_head"]
