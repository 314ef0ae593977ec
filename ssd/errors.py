"""The library's error for bad input, as opposed to a bug.

:class:`InputError` means "the data or file given is not what it should be": a model file
that can't be read, a shard with a corrupt image or an impossible label. Its message is one
line that names the file (and the sample) and the problem, so that the code that called the
library (a pipeline stage) can show it to the user as it is, without a traceback.
"""


class InputError(ValueError):
    """Bad input data or file, with a one-line message naming it."""
