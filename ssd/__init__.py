"""SSD, SSDLite and LSTM-SSD object detectors: the library.

Coordinate convention, everywhere in this package unless a docstring says
otherwise: boxes are ``(x1, y1, x2, y2)`` corners normalised to ``[0, 1]`` by
the image width and height; priors are ``(cx, cy, w, h)`` normalised the same
way. Label 0 is the background; object classes are ``1..num_classes-1``.

The library does no file I/O except in explicitly named loaders and savers
(:mod:`ssd.model_file`, :mod:`ssd.data`), and knows nothing of ``params.yaml``.
"""
