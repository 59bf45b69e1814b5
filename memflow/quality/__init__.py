"""Quality metrics of generated videos: CLIP text alignment per prompt segment,
VBench subject/background consistency, temporal flickering. Pure PyTorch; the
backbones are the user's (memflow.quality.backbones)."""
from .backbones import BackboneError, ClipBackbone, ImageBackbone, check_source, load_clip, load_dino
from .meter import BACKBONE_OF, METRICS, SWITCH_METRICS, QualityMeter

__all__ = ["BACKBONE_OF", "METRICS", "SWITCH_METRICS", "BackboneError", "ClipBackbone", "ImageBackbone", "QualityMeter",
           "check_source", "load_clip", "load_dino"]
