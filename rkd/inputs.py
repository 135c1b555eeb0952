"""What every rkd model receives: RGB images scaled to ``[0, 1]``, then normalised per channel
with the ImageNet statistics below (those the pretrained backbones were trained with; they also
keep inputs near zero for backbones trained from scratch).

The data layer normalises with these, the models layer builds on them (folding them into
pretrained weights, or renormalising for an OpenMMLab model's own preprocessor) and export
writes them into the model card; one definition keeps the three in step.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]
