"""Weights from elsewhere: loading them with a report, and converting foreign layouts.

* :mod:`ssd.weights.loading`: copy matching tensors into a model and say what
  was loaded and which layers start fresh, and why (nothing stays random silently);
* :mod:`ssd.weights.vgg16`: ImageNet VGG16 (torchvision's, or ssd.pytorch's
  reduced-fc file) into SSD300's backbone, fc6/fc7 subsampled into conv6/conv7;
* one module per foreign detector checkpoint (:data:`ssd.weights.convert.CONVERTERS`):
  ssd.pytorch, ssds.pytorch, torchvision's COCO SSD300 and SSDLite320.
"""
