"""Dataset sources: one small module per annotation format, and the shard writers they share.

A source reads its format's annotations and returns a :class:`~.records.Listing` of
common records (:class:`~.records.Frame` for frame datasets, :class:`~.records.Video`
for clip datasets); it never reads pixels. :func:`~.frame_writer.write_frames` and
:func:`~.clip_writer.write_clips` read the images in worker processes, check every box
against the real image, and write the shards. Bad input is reported to a
:class:`~.report.Report` (skipped, fixed or converted, with the reason) and never stops
the others, unless the report is strict.

Formats: :mod:`.voc` (Pascal VOC), :mod:`.voc_frames` (frame sequences in VOC layout),
:mod:`.video` (video files or frame folders with box lists or MOT ``gt.txt``).
Adding one is adding a module with a ``read(root, layout, report) -> Listing``.
"""
