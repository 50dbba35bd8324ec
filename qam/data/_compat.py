"""Importing `ogbench` quietly on headless machines."""

import warnings
from types import ModuleType


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
