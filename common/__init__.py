"""cleanflow's shared environment: what every algorithm file stands on.

Model adapters (`common.models`), the SDE step and rollout (`common.sde`, `common.rollout`),
rewards (`common.rewards`), prompt data (`common.data`) and the embedded toy world
(`common.toy`). Algorithm files import from here; nothing here is an algorithm.

This package is deliberately *not* installed into site-packages (see pyproject.toml): a
top-level package called `common` would collide with other projects. Run the scripts from
the repository root, as `python flow_grpo.py` or `python -m common.toy.pretrain`.
"""
