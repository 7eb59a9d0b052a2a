"""Typed stage configuration.

Each chain stage has one frozen pydantic model derived from :class:`StageConfig`. Unknown parameters
are errors (``extra="forbid"``), never warnings. Notebooks build their config from the names bound in
their ``parameters`` cell with :meth:`StageConfig.from_namespace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from niteru.errors import ConfigError

DEFAULT_RUN_DIR = "runs/dev"


class StageConfig(BaseModel):
    """Fields shared by every stage. Subclasses add their own and set ``stage``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: ClassVar[str] = ""

    run_dir: str = Field(DEFAULT_RUN_DIR, description="run folder; stages read upstream folders in it")
    cache_dir: str = Field("", description="shared content-addressed cache; '' = <runs root>/_cache")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StageConfig":
        """Validate a parameter mapping; raise :class:`ConfigError` naming every bad field."""
        try:
            return cls(**dict(params))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(cls, exc)) from None

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> "StageConfig":
        """Pick this config's fields out of a notebook's globals (the ``parameters`` cell)."""
        return cls.from_params({k: namespace[k] for k in cls.model_fields if k in namespace})

    # ----------------------------------------------------------------- paths
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).expanduser().resolve()

    @property
    def run_id(self) -> str:
        return self.run_path.name

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        return self.run_path.parent / "_cache"

    def stage_dir(self, name: str | None = None, create: bool = True) -> Path:
        path = self.run_path / (name or self.stage)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def upstream_dir(self, name: str) -> Path:
        """Folder of an upstream stage; a clear error when it has not run yet."""
        path = self.run_path / name
        if not (path / "stage.json").exists():
            raise ConfigError(
                f"stage '{self.stage}' needs the output of stage '{name}' in {path}, which is missing or "
                f"incomplete: run the '{name}' notebook first (or `niteru run`) with run_dir={self.run_dir!r}"
            )
        return path

    def resolved_device(self) -> str:
        from niteru.device import resolve_device

        return resolve_device(self.device)


def format_validation_error(cls: type[BaseModel], exc: ValidationError) -> str:
    lines = [f"invalid parameters for {cls.__name__}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            lines.append(f"  - unknown parameter '{loc}' (known: {known})")
        elif err["type"] == "missing":
            lines.append(f"  - missing required parameter '{loc}'")
        else:
            lines.append(f"  - {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
