"""Stage entry points: thin shells that read params.yaml, call the library and write outputs atomically."""

import os

# OpenMP threads that spin while waiting for work steal the cores the loader workers and the
# other processes of a run need: on a busy 2-core machine a training step was 5-10x slower
# with the default (active) policy. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
