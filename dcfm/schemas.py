"""Arrow schemas of the segment job's outputs, built from the versioned JSON files in ``schemas/``
(installed as the package ``dcfm.output_schemas``; in a checkout, ``dcfm/output_schemas`` links to it).

The JSON files are the contract (data teams can read them without Python); the writer and the tests
both go through ``output_schema(name)`` so they cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import pyarrow as pa

SCHEMA_NAMES = ("frames", "videos", "errors")


@dataclass(frozen=True)
class OutputSchema:
    name: str
    version: int
    schema: pa.Schema  # every column, partition columns included
    partition_by: tuple[str, ...]

    @property
    def file_schema(self) -> pa.Schema:
        """The columns stored inside the Parquet files (partition columns live in the path)."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by], metadata=self.schema.metadata)


def _arrow_type(spec: Any) -> pa.DataType:
    if isinstance(spec, str):
        return pa.type_for_alias(spec)
    if "list" in spec:
        return pa.list_(_arrow_type(spec["list"]))
    if "struct" in spec:
        return pa.struct([pa.field(f["name"], _arrow_type(f["type"]), nullable=False) for f in spec["struct"]])
    raise ValueError(f"unsupported schema type {spec!r}")


@lru_cache(maxsize=None)
def output_schema(name: str) -> OutputSchema:
    """The schema ``name`` (frames, videos or errors) as Arrow, with its version in the metadata."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown output schema {name!r}; expected one of {SCHEMA_NAMES}")
    spec = json.loads(resources.files("dcfm.output_schemas").joinpath(f"{name}.json").read_text())
    fields = [
        pa.field(f["name"], _arrow_type(f["type"]), nullable=f["nullable"], metadata={"doc": f["doc"]})
        for f in spec["fields"]
    ]
    metadata = {"dcfm.schema": spec["name"], "dcfm.schema_version": str(spec["version"])}
    return OutputSchema(spec["name"], spec["version"], pa.schema(fields, metadata=metadata), tuple(spec["partition_by"]))
