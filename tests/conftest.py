import os

# As in pipeline/__init__.py: passive OpenMP waiting, set before anything imports torch, so
# tests running beside subprocesses (loader workers, two-process runs) don't starve them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
