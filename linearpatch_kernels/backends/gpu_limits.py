"""Per-architecture GPU limits the backends check their launches against (no GPU needed)."""

from __future__ import annotations

# Opt-in shared memory per block in bytes, by compute capability (CUDA C++ Programming Guide,
# "Compute Capabilities"): the one table the Triton and CUDA backends' automatic choice and the
# ahead-of-time checks use.
SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
    (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448, (12, 0): 101_376, (12, 1): 101_376,
}
DEFAULT_SHARED_MEMORY = 101_376  # the smallest of the table, for an unlisted architecture


def shared_memory_limit(capability: tuple[int, int]) -> int:
    return SHARED_MEMORY_PER_BLOCK.get(tuple(capability), DEFAULT_SHARED_MEMORY)


def arch_name(capability: tuple[int, int]) -> str:
    """``sm_86`` for compute capability (8, 6)."""
    return f"sm_{capability[0]}{capability[1]}"
