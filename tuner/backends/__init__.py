"""Where trials run. `local`: worker processes on this machine."""

from tuner.backends.base import Backend, RunPlan

__all__ = ["Backend", "RunPlan"]
