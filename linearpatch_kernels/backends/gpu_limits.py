"""Per-architecture GPU limits the backends check their launches against (no GPU needed)."""

from __future__ import annotations

class _Limits(dict):
    """A table of limits that counts its changes (``version``), so that a backend choice cached from
    it (``backends.plan_for``) is made again after an entry changes."""

    version = 0

    def __setitem__(self, key, value):
        _Limits.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _Limits.version += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        _Limits.version += 1
        super().update(*args, **kwargs)


def limits_version() -> int:
    """Changes whenever an entry of the limit tables changes."""
    return _Limits.version


# Opt-in shared memory per block in bytes, by compute capability (CUDA C++ Programming Guide,
# "Compute Capabilities"): the one table the Triton and CUDA backends' automatic choice and the
# ahead-of-time checks use.
SHARED_MEMORY_PER_BLOCK = _Limits({
    (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
    (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448, (12, 0): 101_376, (12, 1): 101_376,
})
DEFAULT_SHARED_MEMORY = 101_376  # the smallest of the table, for an unlisted architecture


# Per multiprocessor, for occupancy (same source): shared memory its blocks can use in all (bytes),
# resident warps and resident blocks; 65,536 32-bit registers, allocated per warp in units of 256;
# 1 KiB of shared memory reserved by the system per block (compute capability 8.0 and newer).
SHARED_MEMORY_PER_SM = _Limits({
    (8, 0): 167_936, (8, 6): 102_400, (8, 7): 167_936, (8, 9): 102_400,
    (9, 0): 233_472, (10, 0): 233_472, (10, 3): 233_472, (12, 0): 102_400, (12, 1): 102_400,
})
WARPS_PER_SM = _Limits({(8, 0): 64, (8, 6): 48, (8, 7): 48, (8, 9): 48, (9, 0): 64, (10, 0): 64, (10, 3): 64,
                        (12, 0): 48, (12, 1): 48})
BLOCKS_PER_SM = _Limits({(8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32, (10, 0): 32, (10, 3): 32,
                         (12, 0): 32, (12, 1): 32})
REGISTERS_PER_SM = 65_536
REGISTER_UNIT = 256
RESERVED_SHARED_PER_BLOCK = 1024


def resident_blocks(capability: tuple[int, int], registers: int, threads: int, shared_bytes: int) -> int:
    """Blocks of ``threads`` threads using ``registers`` registers per thread and ``shared_bytes`` of
    shared memory that one multiprocessor of this architecture holds at once (0: none fits). An
    unlisted architecture gets the smallest limits of the tables."""
    capability = tuple(capability)
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_warps = WARPS_PER_SM.get(capability, min(WARPS_PER_SM.values())) // warps
    smem = SHARED_MEMORY_PER_SM.get(capability, min(SHARED_MEMORY_PER_SM.values()))
    blocks = BLOCKS_PER_SM.get(capability, min(BLOCKS_PER_SM.values()))
    by_shared = smem // (shared_bytes + RESERVED_SHARED_PER_BLOCK) if shared_bytes else blocks
    return max(0, min(by_registers, by_warps, by_shared, blocks))


def shared_memory_limit(capability: tuple[int, int]) -> int:
    return SHARED_MEMORY_PER_BLOCK.get(tuple(capability), DEFAULT_SHARED_MEMORY)


def arch_name(capability: tuple[int, int]) -> str:
    """``sm_86`` for compute capability (8, 6)."""
    return f"sm_{capability[0]}{capability[1]}"
