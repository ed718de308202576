"""Adaptations of third-party libraries to machines they do not target (kept apart from rpo's own code).

- `rpo.compat.megatron_cpu`: megatron-core on a machine without CUDA (applied by rpo.models.init_parallel).
"""
