"""Projection heads trained with metric learning (:mod:`niteru.train`) and how they are stored.

A :class:`ProjectionHead` maps a backbone's pooled features (raw, as the backbone returns them) to a smaller,
L2-normalised embedding. The embed stage applies it after the backbone when ``EmbedConfig.head`` names one:

* a file written by :func:`save_head` (``torch.load(weights_only=True)`` compatible: config, state dict and
  JSON metadata), or
* ``bentoml:<name>:<version>`` (or ``bentoml:<name>`` for the latest) in the BentoML model store
  (``$BENTOML_HOME/models``), with the metrics and training parameters as model metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from niteru.errors import ConfigError
from niteru.io import atomic_path

log = logging.getLogger(__name__)

BENTOML_PREFIX = "bentoml:"
HEAD_STATE = "head.pt"
HEAD_JSON = "head.json"
FORMAT = "niteru-projection-head/1"


class ProjectionHead(nn.Module):
    """L2-normalise the input, then ``skip(x) + MLP(x)``, L2-normalised again.

    The linear skip keeps what the backbone already separates; the MLP learns the rest. ``hidden_dim=0``
    makes the head a single linear projection.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or hidden_dim < 0:
            raise ConfigError(f"invalid head sizes in_dim={in_dim}, out_dim={out_dim}, hidden_dim={hidden_dim}")
        self.in_dim, self.out_dim, self.hidden_dim, self.dropout = in_dim, out_dim, hidden_dim, dropout
        self.skip = nn.Linear(in_dim, out_dim, bias=False)
        self.mlp = (nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden_dim, out_dim)) if hidden_dim else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        out = self.skip(x)
        if self.mlp is not None:
            out = out + self.mlp(x)
        return F.normalize(out, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ProjectionHead":
        return cls(int(config["in_dim"]), int(config["out_dim"]), int(config.get("hidden_dim", 0)),
                   float(config.get("dropout", 0.0)))


# ------------------------------------------------------------------------------------------ storage
def save_head(head: ProjectionHead, path_or_bentoml: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> str:
    """Store ``head`` with ``metadata`` (JSON-serialisable: metrics, training parameters, input model id).

    ``path_or_bentoml``: a file path, or ``bentoml:<name>`` to create a new version in the BentoML model
    store. Returns the spec :func:`load_head` (and ``EmbedConfig.head``) accepts.
    """
    metadata = json.loads(json.dumps(metadata or {}, default=str))  # fail early on non-JSON values
    dest = str(path_or_bentoml)
    if dest.startswith(BENTOML_PREFIX):
        return _save_bentoml(head, dest[len(BENTOML_PREFIX):], metadata)
    payload = {"format": FORMAT, "config": head.config(), "metadata_json": json.dumps(metadata, sort_keys=True),
               "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
    with atomic_path(dest, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return str(Path(dest).resolve())


def load_head(spec: str | os.PathLike[str]) -> tuple[ProjectionHead, dict[str, Any]]:
    """Rebuild a head (eval mode, CPU) and its metadata from a file path or ``bentoml:<name>[:<version>]``."""
    spec = str(spec)
    if spec.startswith(BENTOML_PREFIX):
        return _load_bentoml(spec[len(BENTOML_PREFIX):])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"projection head {path} does not exist: train one with notebooks/train_metric.ipynb "
                          "or pass bentoml:<name>:<version>")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load projection head {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a niteru projection head (format {FORMAT!r})")
    head = _build(payload["config"], payload["state_dict"], str(path))
    return head, json.loads(payload.get("metadata_json") or "{}")


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> ProjectionHead:
    head = ProjectionHead.from_config(config)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"projection head {where} does not match its config {config}: {str(exc).splitlines()[0]}") from None
    return head.eval()


def model_store() -> Any:
    """The BentoML model store under the current ``$BENTOML_HOME`` (read at call time, not import time)."""
    from bentoml._internal.models import ModelStore

    home = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
    folder = Path(home).expanduser() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(folder))


def _save_bentoml(head: ProjectionHead, name: str, metadata: dict[str, Any]) -> str:
    import bentoml

    if not name or ":" in name:
        raise ConfigError(f"save a head as 'bentoml:<name>' (BentoML assigns the version), got 'bentoml:{name}'")
    labels = {"kind": "projection-head", "framework": "torch"}
    bento_meta = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))}
    bento_meta["niteru"] = json.dumps(metadata, sort_keys=True)  # nested values, verbatim
    with bentoml.models.create(name, labels=labels, metadata=bento_meta, _model_store=model_store()) as model:
        folder = Path(model.path)
        torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, folder / HEAD_STATE)
        (folder / HEAD_JSON).write_text(json.dumps({"format": FORMAT, "config": head.config(), "metadata": metadata},
                                                   indent=2, sort_keys=True))
    log.info("saved projection head as BentoML model %s", model.tag)
    return f"{BENTOML_PREFIX}{model.tag}"


def _load_bentoml(tag: str) -> tuple[ProjectionHead, dict[str, Any]]:
    import bentoml

    try:
        model = bentoml.models.get(tag, _model_store=model_store())
    except Exception as exc:  # bentoml raises NotFound naming the store folder
        raise ConfigError(f"projection head {tag!r} is not in the BentoML model store (BENTOML_HOME): {exc}") from None
    folder = Path(model.path)
    if not (folder / HEAD_JSON).is_file():
        raise ConfigError(f"BentoML model {model.tag} is not a niteru projection head (no {HEAD_JSON})")
    info = json.loads((folder / HEAD_JSON).read_text())
    state = torch.load(folder / HEAD_STATE, map_location="cpu", weights_only=True)
    head = _build(info["config"], state, str(model.tag))
    return head, {**info.get("metadata", {}), "bentoml_tag": str(model.tag)}


def list_heads() -> list[dict[str, Any]]:
    """Projection heads in the BentoML model store, newest first, with their headline metadata."""
    import bentoml

    out = []
    for model in bentoml.models.list(_model_store=model_store()):
        if (model.info.labels or {}).get("kind") != "projection-head":
            continue
        meta = {k: v for k, v in (model.info.metadata or {}).items() if k != "niteru"}
        out.append({"tag": str(model.tag), "created": model.info.creation_time.isoformat(), **meta})
    return sorted(out, key=lambda r: r["created"], reverse=True)
