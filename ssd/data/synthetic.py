"""Deterministic synthetic data sets: cluttered VOC-style images and degraded infrared videos.

A fresh clone has no Pascal VOC and no internet, so the pipeline's default data
is generated here. Every image and every video is a pure function of
``(seed, index)``: its random generator is ``numpy.random.default_rng([seed,
stream, index])``, so items can be generated in any order, by any number of
processes, and always come out the same. This module does no file I/O; the
``sample`` stage (:mod:`pipeline.sample`) writes the results to disk.

Box convention (this module only): pixels ``(x1, y1, x2, y2)`` as floats in
the image as generated, with ``x2``/``y2`` exclusive, so a box covering a whole
``W x H`` image is ``(0, 0, W, H)``. Boxes are exact: an object's pixels are
columns ``x1 .. x2-1`` and rows ``y1 .. y2-1`` and it touches all four sides
(the full object extent, clipped to the image, including parts hidden by
occluders).

Two data sets:

* :func:`voc_image`: a BGR image of ``128..224`` px per side with 0-6 objects of
  :data:`VOC_CLASSES`, each a distinct shape *and* texture (solid shaded disc,
  flat ring, striped square, checkered triangle, star with a bright core,
  dotted cross) in its own hue range, on a cluttered background (gradients,
  low-frequency colour noise, lines, blobs, and distractor shapes that are none
  of the classes, some of them in front of objects).
* :func:`ir_video`: a grey-scale "thermal" video with 1-3 warm objects of
  :data:`IR_CLASSES` moving smoothly over a cool background with sensor noise,
  in which about a third of the frames are degraded (:data:`DEGRADATIONS`) so
  that one frame alone is ambiguous while the frames before it are not. Objects
  keep their true boxes in degraded frames.
"""

# The data sets live in one module each; this one names what they export.
from ssd.data.synthetic_common import (  # noqa: F401
    DEGRADATIONS,
    IR_CLASSES,
    VOC_CLASSES,
    VOC_HUES,
    IrSpec,
    ObjectAnnotation,
    SyntheticImage,
    SyntheticVideo,
    VocSpec,
)
from ssd.data.synthetic_ir import ir_video, video_splits  # noqa: F401
from ssd.data.synthetic_voc import voc_image  # noqa: F401
