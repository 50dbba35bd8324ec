"""Paper-scale studies: the paper's experiments as data, launched locally, on Ray or on SLURM,
and reported with the paper's Table 1 layout and bootstrap confidence intervals.

```
study = qam.studies.STUDIES["main"]                   # 16 methods x 50 tasks x 12 seeds
specs = qam.studies.expand(qam.studies.select(study, methods=["qam"], tasks=["cube-double-play"]))
programs, counts = qam.studies.plan(specs, out="runs/sweeps/main")
qam.studies.run_local(programs, script=qam.studies.DEFAULT_SCRIPT)
```

The command lines are `examples/sweep.py` and `examples/report.py`.
"""

from ._launch import (
    Program as Program,
    ProgramFailed as ProgramFailed,
    finished_members as finished_members,
    local_gpus as local_gpus,
    plan as plan,
    program_env as program_env,
    read_records as read_records,
    require as require,
    run_local as run_local,
    run_ray as run_ray,
    run_slurm as run_slurm,
    slurm_parameters as slurm_parameters,
)
from ._resolve import (
    DEFAULT_SCRIPT as DEFAULT_SCRIPT,
    Resolved as Resolved,
    canonical_json as canonical_json,
    config_hash as config_hash,
    load_main_job as load_main_job,
    resolve as resolve,
)
from ._results import (
    Cell as Cell,
    SeedCurve as SeedCurve,
    collect as collect,
    paper_curve as paper_curve,
    paper_point as paper_point,
    rliable_estimates as rliable_estimates,
    stratified_bootstrap as stratified_bootstrap,
    table as table,
    write_report as write_report,
)
from ._study import (
    MAIN_DOMAINS as MAIN_DOMAINS,
    MAIN_TASKS as MAIN_TASKS,
    PAPER_METHODS as PAPER_METHODS,
    PAPER_NAMES as PAPER_NAMES,
    PAPER_SEEDS as PAPER_SEEDS,
    QUALITY_DOMAINS as QUALITY_DOMAINS,
    QUALITY_METHODS as QUALITY_METHODS,
    QUALITY_TASKS as QUALITY_TASKS,
    SENSITIVITY_TASKS as SENSITIVITY_TASKS,
    STUDIES as STUDIES,
    RunSpec as RunSpec,
    Study as Study,
    Times as Times,
    Variant as Variant,
    domain as domain,
    expand as expand,
    load_study as load_study,
    parse_set as parse_set,
    parse_value as parse_value,
    preset_env as preset_env,
    select as select,
    study_from_dict as study_from_dict,
)
