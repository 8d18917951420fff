"""Planning a training run before any accelerator time is spent (`lmsys plan`).

- `lmsys.plan.planner`: the CLI's plan logic: hardware datasheets, `analyze` (per-device
  memory, collectives, roofline step time and MFU of a config), `search` over meshes and remat
  policies, the TPU ahead-of-time compile (`aot_compile`, `plan_topology`) and the tables.
- `lmsys.plan.analysis`: the analytical formulas: per-device parameter, optimizer-state,
  activation and train-step memory, and the minimum collective bytes of each parallelism.
- `lmsys.plan.hlo`: reading compiled HLO text: collective bytes and matmul FLOPs with loop
  trip counts.

Nothing here runs inside a train or serve step; the step's own code is in lmsys.parallel and
lmsys.train. The model's parameters reach the planner through the model's public API
(lmsys.models.llama.param_specs, count_params, flops_per_token).
"""
