"""The README's core example runs as written."""

import pathlib
import re

import pytest


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.standard_promotion
def test_readme_core_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "lean_adjoint" in b)
    # Smaller networks than the README's defaults keep the test fast; the code is unchanged.
    example = example.replace("obs_dim, action_dim, inv_temp = 37, 25, 1.0",
                              "obs_dim, action_dim, inv_temp = 3, 2, 1.0")  # fmt: skip
    example = example.replace("(256, obs_dim)", "(8, obs_dim)").replace("key, 256)", "key, 8)")
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["loss"].shape == ()
