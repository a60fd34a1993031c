"""TensorRT engines built from an export: the build (`build.py`, needs the `tensorrt` extra and an
NVIDIA GPU) and its verification (`verify.py`). The data the runtime reads as well lives in the
runtime and is re-exported here: `Limits` (runtime.limits), the optimisation profiles
(runtime.profiles) and the engine cache under `OUTDIR/engines/` (runtime.engine_cache).
`prefixport.engines` imports the runtime; the runtime never imports it."""

from ..runtime.engine_cache import ENGINES_DIR, EngineRecord, engine_key, find_engine, records
from ..runtime.limits import Limits
from ..runtime.profiles import Profile, choose_profile, plan_profiles

__all__ = ["ENGINES_DIR", "EngineRecord", "Limits", "Profile", "choose_profile", "engine_key", "find_engine",
           "plan_profiles", "records"]
