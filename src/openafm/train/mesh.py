"""The device mesh of a training run: named dimensions `dp_replicate`, `dp_shard`, `cp`, `tp`.

A run's layout is written `dp_shard=2,tp=2`; one dimension may be -1 ("the rest of the
processes"), and unnamed dimensions are 1, except `dp_shard`, which takes the rest when no
dimension does. The mesh is PyTorch's `DeviceMesh`, so plans address its dimensions by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


class MeshError(ValueError):
    """A mesh that cannot be laid out over the processes at hand."""


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the four mesh dimensions; at most one is -1 (the rest)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        sizes = self.sizes()
        if any(n == 0 or n < -1 for n in sizes):
            raise MeshError(f"mesh sizes must be positive or -1, got {self.text()}")
        if sizes.count(-1) > 1:
            raise MeshError(f"only one mesh dimension may be -1, got {self.text()}")

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """`"dp_shard=2,tp=2"` → a spec; `dp_shard` takes the rest unless a size is -1."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_DIMS:
                raise MeshError(
                    f"bad mesh entry {part!r}: write NAME=SIZE with NAME one of"
                    f" {', '.join(MESH_DIMS)}"
                )
            if name in sizes:
                raise MeshError(f"mesh dimension {name} is given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh size of {name} is not an integer: {value!r}") from None
        if "dp_shard" not in sizes and -1 in sizes.values():
            sizes["dp_shard"] = 1
        return cls(**sizes)

    def sizes(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def text(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def resolve(self, world_size: int) -> dict[str, int]:
        """The size of every dimension for `world_size` processes (-1 filled in)."""
        sizes = dict(zip(MESH_DIMS, self.sizes(), strict=True))
        fixed = math.prod(n for n in sizes.values() if n != -1)
        rest = [name for name, n in sizes.items() if n == -1]
        if rest:
            if world_size % fixed:
                raise MeshError(
                    f"mesh {self.text()} needs a multiple of {fixed} processes, not {world_size}"
                )
            sizes[rest[0]] = world_size // fixed
        elif fixed != world_size:
            raise MeshError(f"mesh {self.text()} has {fixed} places for {world_size} processes")
        return sizes


def build_mesh(spec: MeshSpec, world_size: int, device_type: str = "cpu") -> DeviceMesh:
    """The named 4-D `DeviceMesh` of `spec` over the initialised process group."""
    sizes = spec.resolve(world_size)
    return init_device_mesh(
        device_type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS
    )


def data_parallel_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """`(rank, size)` of this process among the data-parallel replicas (`dp_replicate` x
    `dp_shard`): the batch rows it reads. Ranks differing only in `cp` or `tp` read the same."""
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    rank = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    return rank, replicate.size() * shard.size()
