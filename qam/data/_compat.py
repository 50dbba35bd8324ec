"""Importing `ogbench` quietly on headless machines."""

import warnings
from types import ModuleType
from typing import Any


def import_ogbench() -> ModuleType:
    """Import `ogbench` (and so `mujoco`), which registers its environments with gymnasium.

    On a Linux machine without a display and without `MUJOCO_GL` set, `mujoco` imports `glfw`,
    which warns that `DISPLAY` is missing. `qam.data` never renders, so that warning is
    silenced here; rendering elsewhere still needs `MUJOCO_GL=egl` (or `osmesa`) headless.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="glfw")
        warnings.filterwarnings("ignore", message=".*DISPLAY.*")
        import ogbench

        try:  # dm_control (used by the manipulation envs) initialises glfw on import.
            import dm_control.mjcf  # noqa: F401
        except ImportError:  # pragma: no cover
            pass
    return ogbench


# gymnasium's warning that OGBench's float64 box bounds are cast to float32 (harmless).
CAST_WARNING = ".*precision lowered by casting.*"


def make_gym_env(env_id: str, **kwargs: Any) -> Any:
    """`gymnasium.make(env_id, **kwargs)` for an OGBench environment, without gymnasium's
    warning that OGBench's float64 box bounds are cast to float32.

    OGBench's manipulation environments build a new action `Box` on every access of
    `action_space`, which happens on every `reset`; the warning is harmless and would repeat.
    It is silenced only around `make`, `reset` and `step` of the environments made here."""
    import gymnasium

    import_ogbench()  # registers the environments

    class QuietCasts(gymnasium.Wrapper):
        def reset(self, **reset_kwargs: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAST_WARNING)
                return self.env.reset(**reset_kwargs)

        def step(self, action: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAST_WARNING)
                return self.env.step(action)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CAST_WARNING)
        return QuietCasts(gymnasium.make(env_id, **kwargs))
