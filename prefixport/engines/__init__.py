"""TensorRT engines built from an export: optimisation profiles, the engine cache under
`OUTDIR/engines/`, and the build (`build.py`, needs the `tensorrt` extra and an NVIDIA GPU)."""

from .cache import EngineRecord, engine_key, find_engine, records
from .profiles import Limits, Profile, choose_profile, plan_profiles

__all__ = ["EngineRecord", "Limits", "Profile", "choose_profile", "engine_key", "find_engine", "plan_profiles",
           "records"]
