"""Interactive exploration of a finished run in JupyterLab (``notebooks/explore.ipynb``, not part of the chain).

Two layers, kept apart so the logic is testable without a browser:

* the **model**: pure-ish functions over a loaded run (:class:`RunView`): resolve which run to open, run a
  :class:`Query` (a catalog product or an uploaded image) into a results table, compare two runs' results for
  the same query, render a results table as thumbnails / a static PNG / a standalone HTML page, export it;
* the **widgets**: :class:`Explorer`, an ipywidgets UI whose callbacks only translate widget values into
  model calls and model results into widget values. Tests drive the widgets' values and read
  ``Explorer.results`` and the grid's children.

Results table columns (:data:`RESULT_COLUMNS`): ``rank`` (1..), ``product_id``, ``crop_index``, ``score`` (cosine
similarity), ``category``, ``brand``, ``price``, ``in_stock``, ``image_path``, ``x0, y0, x1, y1`` (the matched
crop, pixels of the EXIF-transposed image, NaN when unknown).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import html
import io
import logging
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pandas as pd
from PIL import Image, ImageDraw
from pydantic import Field

from niteru import runs
from niteru.config import StageConfig
from niteru.errors import ConfigError, NiteruError
from niteru.io import atomic_path, read_json, write_text_atomic

if TYPE_CHECKING:  # heavy or optional imports stay deferred
    import numpy as np
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

EXPLORE_DIR = "explore"
RESULT_COLUMNS = (
    "rank", "product_id", "crop_index", "score", "category", "brand", "price", "in_stock", "image_path",
    "x0", "y0", "x1", "y1",
)
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
ALL_CATEGORIES = "(all)"
NO_COMPARISON = ""
BOX_COLOR = (230, 40, 40)
QUERY_BOX_COLOR = (20, 120, 240)


# ============================================================================================ config
# The notebook parameter ``run_id`` (the run to open) is a field here, while StageConfig derives a read-only
# ``run_id`` property from ``run_dir``. The parent's property would hide the field's value (data descriptors win
# over instance attributes), so ExploreConfig re-exposes the field just below the class; the warning is expected.
warnings.filterwarnings("ignore", message='Field name "run_id" in "ExploreConfig" shadows', category=UserWarning)


class ExploreConfig(StageConfig):
    """Parameters of ``notebooks/explore.ipynb``.

    Which run is opened: ``run_dir`` when given, else ``run_id`` under ``runs_root``, else the latest
    successful run under ``runs_root``.
    """

    stage: ClassVar[str] = EXPLORE_DIR

    run_dir: str = Field("", description="run folder to open; '' = run_id under runs_root")
    runs_root: str = Field("", description="folder holding the runs; '' = $NITERU_RUNS or the repository's runs/")
    run_id: str = Field("", description="run to open; '' = the latest successful run")
    compare_run_id: str = Field("", description="second run for the side panel; '' = previous successful, 'none' = off")
    query_product: str = Field("", description="initial query product id; '' = a random product (seeded)")
    k: int = Field(12, ge=1, le=200, description="number of results")
    search_k: int = Field(-1, ge=-1, description="Annoy search_k; -1 = the index's default")
    category: str = Field("", description="category filter; '' = all categories")
    in_stock_only: bool = Field(True, description="hide out-of-stock results")
    show_boxes: bool = Field(True, description="draw the detection / matched-crop boxes on thumbnails")
    columns: int = Field(6, ge=1, le=20, description="thumbnails per grid row")
    thumb_px: int = Field(160, ge=32, le=1024, description="thumbnail size in pixels")


ExploreConfig.run_id = property(  # type: ignore[assignment, method-assign]
    lambda self: self.__dict__["run_id"], doc="the run to open ('' = the latest successful run)")


def default_runs_root() -> Path:
    """``$NITERU_RUNS``, else the ``runs/`` folder next to the repository's ``notebooks/``, else ``./runs``."""
    env = os.environ.get("NITERU_RUNS")
    if env:
        return Path(env).expanduser().resolve()
    from niteru.chain import default_notebooks_dir

    try:
        return default_notebooks_dir().parent / "runs"
    except ConfigError:
        return Path("runs").resolve()


def resolve_runs_root(cfg: ExploreConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve().parent
    return Path(cfg.runs_root).expanduser().resolve() if cfg.runs_root else default_runs_root()


def explorable_runs(runs_root: Path) -> list[runs.RunInfo]:
    """Runs under ``runs_root`` that have a complete index (searchable), newest first."""
    found = [r for r in runs.list_runs(runs_root) if (r.path / "index" / runs.STAGE_SUMMARY).exists()]
    return list(reversed(found))


def resolve_run(runs_root: Path, run_id: str = "") -> Path:
    """The folder of ``run_id`` under ``runs_root``; ``''`` = the latest successful run with an index."""
    if run_id:
        path = runs_root / run_id
        if not (path / runs.MANIFEST).is_file():
            known = ", ".join(r.run_id for r in runs.list_runs(runs_root)[-5:]) or "none"
            raise ConfigError(f"run {run_id!r} not found in {runs_root} (latest runs: {known}); "
                              "pass an existing run_id or '' for the latest successful run")
        return path
    for info in explorable_runs(runs_root):
        if info.status == runs.STATUS_SUCCEEDED:
            return info.path
    raise ConfigError(f"no successful run with an index in {runs_root}: run the chain first (`niteru run`), "
                      "or set runs_root / $NITERU_RUNS to the folder holding your runs")


def resolve_config_run(cfg: ExploreConfig) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir).expanduser().resolve()
        if not (path / "index" / runs.STAGE_SUMMARY).exists():
            raise ConfigError(f"run_dir={cfg.run_dir!r} has no complete index/ folder: run the chain up to "
                              "the 'index' stage first")
        return path
    return resolve_run(resolve_runs_root(cfg), cfg.run_id)


def resolve_compare_run(run_path: Path, compare_run_id: str) -> Path | None:
    """The run compared against ``run_path``: explicit id, previous successful one (``''``), or none."""
    if compare_run_id.lower() == "none":
        return None
    if compare_run_id:
        return resolve_run(run_path.parent, compare_run_id)
    previous = runs.previous_successful_run(run_path, stage="index")
    return previous if previous and (previous / "index" / runs.STAGE_SUMMARY).exists() else None


# ============================================================================================ model
@dataclass(frozen=True)
class Query:
    """What to search for: a catalog product (``kind='product'``) or an image (``kind='image'``)."""

    kind: Literal["product", "image"]
    product_id: str = ""
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    name: str = ""

    @classmethod
    def product(cls, product_id: str) -> "Query":
        return cls("product", product_id=str(product_id), name=str(product_id))

    @classmethod
    def from_image(cls, image: Image.Image, name: str = "upload") -> "Query":
        return cls("image", image=image, name=name)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "upload") -> "Query":
        from niteru.images import load_rgb

        return cls.from_image(load_rgb(bytes(data)), name=name)

    @property
    def label(self) -> str:
        return f"product {self.product_id}" if self.kind == "product" else f"image {self.name}"


@dataclass(frozen=True)
class SearchParams:
    k: int = 12
    search_k: int | None = None
    category: str = ""
    in_stock_only: bool = True

    def filters(self) -> Any:
        from niteru.search import Filters

        return Filters(category=self.category or None, in_stock_only=self.in_stock_only)


@dataclass
class RunView:
    """Everything the explorer needs from one run, loaded once (the index is memory-mapped)."""

    run_id: str
    path: Path
    index: Any  # niteru.index.LoadedIndex
    engine: Any  # niteru.search.SearchEngine
    catalog: pd.DataFrame  # indexed by product_id
    items: pd.DataFrame  # crops of the index: product_id, crop_index, x0..y1
    boxes: pd.DataFrame  # detect/boxes.parquet (may be empty)
    metrics: dict[str, Any]
    info: runs.RunInfo | None = None
    device: str = "cpu"  # 'auto' is resolved when the models load (product queries never import torch)
    _detector: Any = field(default=None, repr=False)
    _embedder: Any = field(default=None, repr=False)
    query_cache: dict[tuple[str, int], tuple[Any, Any, Any]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ catalog views
    @functools.cached_property
    def product_ids(self) -> list[str]:
        """Products present in the index, sorted."""
        return sorted(self.index.idmap["product_id"].astype(str).unique())

    @functools.cached_property
    def categories(self) -> list[str]:
        return sorted(self.index.idmap["category"].dropna().astype(str).unique())

    def image_path(self, product_id: str) -> str | None:
        if product_id in self.catalog.index:
            row = self.catalog.loc[product_id]
            for col in ("image_path", "image_uri"):
                value = row.get(col)
                if isinstance(value, str) and value:
                    return value
        idmap = self.index.idmap
        hit = idmap.loc[idmap["product_id"].astype(str) == product_id]
        if len(hit) and "image_path" in hit and isinstance(hit["image_path"].iloc[0], str):
            return hit["image_path"].iloc[0]
        return None

    def product_boxes(self, product_id: str) -> list[tuple[float, float, float, float]]:
        """The boxes the run's detect stage kept for a product (what the index was built from)."""
        frame = self.items if len(self.items) else self.boxes
        if not len(frame) or not set(BOX_COLUMNS) <= set(frame.columns):
            return []
        rows = frame.loc[frame["product_id"].astype(str) == product_id].sort_values("crop_index")
        return [tuple(float(v) for v in r) for r in rows[list(BOX_COLUMNS)].itertuples(index=False)]

    # ------------------------------------------------------------------ models (lazy, for image queries)
    def detector(self) -> Any:
        if self._detector is None:
            from niteru.detect import load_detector
            from niteru.device import resolve_device

            self._detector = load_detector(self.path / "detect" / "detector.json", device=resolve_device(self.device))
        return self._detector

    def embedder(self) -> Any:
        if self._embedder is None:
            from niteru.device import resolve_device
            from niteru.embed import load_embedder

            self._embedder = load_embedder(self.path / "embed" / "model.json", device=resolve_device(self.device))
        return self._embedder

    def detect_params(self) -> dict[str, Any]:
        """The crop policy and min_score the run's detect stage used: detect/detector.json, else the run's
        manifest, else the stage defaults (so an uploaded image is cropped like the catalog was)."""
        from niteru.detect import DetectConfig

        recorded: dict[str, Any] = {}
        manifest_path = self.path / runs.MANIFEST
        if manifest_path.exists():
            recorded = dict(read_json(manifest_path).get("stages", {}).get("detect", {}).get("parameters", {}))
        detector_json = self.path / "detect" / "detector.json"
        if detector_json.exists():
            recorded.update({k: v for k, v in read_json(detector_json).items() if k in ("policy", "min_score")})
        fields = DetectConfig.model_fields
        return {name: recorded.get(name, fields[name].default) for name in ("policy", "min_score")}


def load_run(run_path: str | os.PathLike[str], device: str = "cpu") -> RunView:
    """Open a run for exploration: its index (mmap), id map, catalog, crop boxes and quality metrics."""
    from niteru.index import load_index
    from niteru.search import SearchEngine

    path = Path(run_path).expanduser().resolve()
    if not (path / "index" / runs.STAGE_SUMMARY).exists():
        raise ConfigError(f"{path} has no complete index/ folder: run the chain up to the 'index' stage first")
    model_json = path / "embed" / "model.json"
    model = read_json(model_json) if model_json.exists() else {}
    model_id = model.get("model_id") or model.get("id")
    index = load_index(path / "index", expected_model_id=model_id)
    catalog = _read_parquet(path / "extract" / "catalog.parquet")
    if len(catalog):
        if "fetch_status" in catalog:
            catalog = catalog.loc[catalog["fetch_status"] == "ok"]
        catalog = catalog.assign(product_id=catalog["product_id"].astype(str)).set_index("product_id", drop=False)
    info = next((r for r in runs.list_runs(path.parent) if r.path.resolve() == path), None)
    return RunView(
        run_id=path.name, path=path, index=index, engine=SearchEngine(index), catalog=catalog,
        items=_read_parquet(path / "embed" / "items.parquet"), boxes=_read_parquet(path / "detect" / "boxes.parquet"),
        metrics=run_metrics(path), info=info, device=device,
    )


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def run_metrics(run_path: Path) -> dict[str, Any]:
    """Flat scalar quality metrics of a run: evaluate/metrics.json, else every stage's stage.json metrics."""
    metrics_file = run_path / "evaluate" / "metrics.json"
    if metrics_file.exists():
        return flatten_metrics(read_json(metrics_file))
    merged: dict[str, Any] = {}
    for stage_json in sorted(run_path.glob(f"*/{runs.STAGE_SUMMARY}")):
        merged.update(read_json(stage_json).get("metrics") or {})
    return flatten_metrics(merged)


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``a.b.c`` keys; only scalar leaves (numbers, strings, bools, None) are kept."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (int, float, str, bool)):
            flat[name] = value
    return flat


def compare_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> pd.DataFrame:
    """Side-by-side metrics of two runs with the numeric difference ``b - a``."""
    keys = sorted(set(a) | set(b))
    rows = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        rows.append({"metric": key, "a": va, "b": vb, "delta": (vb - va) if numeric else None})
    return pd.DataFrame(rows, columns=["metric", "a", "b", "delta"])


# ------------------------------------------------------------------------------------------ search
def query_vector(run: RunView, query: Query) -> tuple["np.ndarray", list[tuple[float, float, float, float]]]:
    """Embed an image query with the run's own detector + embedder (the models that built its index).

    Returns the vector of the primary crop (the first crop ``select_crops`` keeps under the run's
    detection policy) and every kept box, for display.
    """
    from niteru.detect import crop, select_crops

    if query.image is None:
        raise ConfigError(f"{query.label} has no image to embed")
    key = (query.name, id(query.image))
    cached = run.query_cache.get(key)
    if cached is not None and cached[0] is query.image:
        return cached[1], cached[2]
    image = query.image
    params = run.detect_params()
    boxes = run.detector().detect([image])[0]
    kept = select_crops(boxes, str(params["policy"]), float(params["min_score"]), image.size)
    vectors = run.embedder().embed([crop(image, kept[0])])
    result = vectors[0], [(float(b.x0), float(b.y0), float(b.x1), float(b.y1)) for b in kept]
    run.query_cache.clear()  # one image query at a time; keeps the uploaded image's vector while controls change
    run.query_cache[key] = (query.image, *result)
    return result


def search(run: RunView, query: Query, params: SearchParams) -> pd.DataFrame:
    """Run a query against a run's index with filters; returns the results table (:data:`RESULT_COLUMNS`).

    A product query uses the run's stored vectors when the product is in the index; otherwise (e.g. the
    product is new in another run) its image is embedded with this run's models, like an uploaded image.
    """
    filters = params.filters()
    if query.kind == "product" and query.product_id in set(run.product_ids):
        return hits_table(run, run.engine.by_product(query.product_id, params.k, filters, search_k=params.search_k))
    image_query = query
    if query.kind == "product":
        path = run.image_path(query.product_id)
        if path is None:
            raise ConfigError(f"product {query.product_id!r} is not in run {run.run_id} and has no image to embed")
        from niteru.images import load_rgb

        image_query = Query.from_image(load_rgb(path), name=query.product_id)
    vec, _ = query_vector(run, image_query)
    exclude = (query.product_id,) if query.product_id else ()
    return hits_table(run, run.engine.by_vector(vec, params.k, filters, search_k=params.search_k, exclude=exclude))


def _hit(hit: Any) -> tuple[str, int, float, Mapping[str, Any]]:
    """(product_id, crop_index, score, metadata) from a search Hit (named tuple, dataclass or tuple)."""
    if hasattr(hit, "product_id"):
        return str(hit.product_id), int(hit.crop_index), float(hit.score), dict(getattr(hit, "metadata", {}) or {})
    product_id, crop_index, score, metadata = hit
    return str(product_id), int(crop_index), float(score), dict(metadata or {})


def hits_table(run: RunView, hits: Sequence[Any]) -> pd.DataFrame:
    """Search hits -> the results table, joined with the crop boxes of the run's embed/items.parquet."""
    boxes: dict[tuple[str, int], tuple[float, ...]] = {}
    if len(run.items) and set(BOX_COLUMNS) <= set(run.items.columns):
        for row in run.items[["product_id", "crop_index", *BOX_COLUMNS]].itertuples(index=False):
            boxes[(str(row[0]), int(row[1]))] = tuple(float(v) for v in row[2:])
    rows = []
    for rank, hit in enumerate(hits, start=1):
        product_id, crop_index, score, meta = _hit(hit)
        box = boxes.get((product_id, crop_index), (math.nan,) * 4)
        rows.append({
            "rank": rank, "product_id": product_id, "crop_index": crop_index, "score": score,
            "category": meta.get("category"), "brand": meta.get("brand"), "price": meta.get("price"),
            "in_stock": meta.get("in_stock"),
            "image_path": meta.get("image_path") or run.image_path(product_id),
            **dict(zip(BOX_COLUMNS, box)),
        })
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def compare_results(a: pd.DataFrame, b: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """How two runs' result lists for the same query differ.

    Returns summary numbers (``overlap`` = shared products / max(len), ``jaccard``, ``mean_score_a/b``,
    ``n_a/n_b``) and a merged table: product_id, rank_a, rank_b, score_a, score_b (NaN where absent).
    """
    pa_ = a.drop_duplicates("product_id")[["product_id", "rank", "score"]]
    pb_ = b.drop_duplicates("product_id")[["product_id", "rank", "score"]]
    set_a, set_b = set(pa_["product_id"]), set(pb_["product_id"])
    union = set_a | set_b
    summary = {
        "n_a": float(len(set_a)), "n_b": float(len(set_b)),
        "overlap": len(set_a & set_b) / max(len(set_a), len(set_b), 1),
        "jaccard": len(set_a & set_b) / len(union) if union else 1.0,
        "mean_score_a": float(pa_["score"].mean()) if len(pa_) else math.nan,
        "mean_score_b": float(pb_["score"].mean()) if len(pb_) else math.nan,
    }
    merged = pa_.merge(pb_, on="product_id", how="outer", suffixes=("_a", "_b"))
    merged = merged.sort_values(["rank_a", "rank_b"], na_position="last").reset_index(drop=True)
    return summary, merged[["product_id", "rank_a", "rank_b", "score_a", "score_b"]]


def random_product(run: RunView, rng: random.Random, category: str = "") -> str:
    idmap = run.index.idmap
    pool = idmap if not category else idmap.loc[idmap["category"].astype(str) == category]
    ids = sorted(pool["product_id"].astype(str).unique())
    if not ids:
        raise ConfigError(f"run {run.run_id} has no product in category {category!r}")
    return rng.choice(ids)


# ------------------------------------------------------------------------------------------ rendering
Box = tuple[float, float, float, float]


def draw_boxes(image: Image.Image, boxes: Sequence[Box], color: tuple[int, int, int] = BOX_COLOR) -> Image.Image:
    """A copy of ``image`` with rectangles drawn (line width scaled to the image size)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 120))
    for box in boxes:
        if any(math.isnan(v) for v in box):
            continue
        draw.rectangle([box[0], box[1], box[2], box[3]], outline=color, width=width)
    return out


def thumbnail(image: Image.Image, size: int, boxes: Sequence[Box] = (), color: tuple[int, int, int] = BOX_COLOR,
              ) -> Image.Image:
    """Boxes drawn at full resolution, then shrunk into a ``size`` x ``size`` white square."""
    img = draw_boxes(image, boxes, color) if boxes else image.copy()
    img.thumbnail((size, size))
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return square


@functools.lru_cache(maxsize=1024)
def _thumbnail_jpeg(path: str, size: int, boxes: tuple[Box, ...], color: tuple[int, int, int]) -> bytes:
    from niteru.images import load_rgb

    buf = io.BytesIO()
    thumbnail(load_rgb(path), size, boxes, color).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumbnail_jpeg(path: str | None, size: int, boxes: Sequence[Box] = (), color: tuple[int, int, int] = BOX_COLOR,
                   ) -> bytes:
    """JPEG thumbnail bytes of an image file (cached); a grey placeholder when it cannot be read."""
    clean = tuple(tuple(float(v) for v in b) for b in boxes if not any(math.isnan(float(v)) for v in b))
    if path:
        try:
            return _thumbnail_jpeg(str(path), size, clean, color)  # type: ignore[arg-type]
        except NiteruError as exc:
            log.warning("cannot show %s: %s", path, exc)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 200, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def image_jpeg(image: Image.Image, size: int, boxes: Sequence[Box] = (), color: tuple[int, int, int] = QUERY_BOX_COLOR,
               ) -> bytes:
    buf = io.BytesIO()
    thumbnail(image, size, boxes, color).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def result_boxes(row: Mapping[str, Any], show_boxes: bool) -> tuple[Box, ...]:
    if not show_boxes:
        return ()
    box = tuple(float(row[c]) for c in BOX_COLUMNS)
    return () if any(math.isnan(v) for v in box) else (box,)  # type: ignore[return-value]


def caption(row: Mapping[str, Any]) -> str:
    """One result's caption: product id, category, score (and price / stock when known)."""
    parts = [f"#{int(row['rank'])} {row['product_id']}", f"{row.get('category') or '?'}", f"score {row['score']:.3f}"]
    price = row.get("price")
    if price is not None and not (isinstance(price, float) and math.isnan(price)):
        parts.append(f"{float(price):.2f}" + ("" if row.get("in_stock") in (True, None) else " · out of stock"))
    return " · ".join(parts)


def grid_html(results: pd.DataFrame, title: str, query_jpeg: bytes | None, show_boxes: bool, thumb_px: int = 160,
              columns: int = 6, metrics: Mapping[str, Any] | None = None) -> str:
    """A standalone HTML page of a result grid (thumbnails inlined as base64, no external files)."""
    def img_tag(data: bytes) -> str:
        return f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" width="{thumb_px}">'

    cells = []
    for row in results.to_dict("records"):
        jpeg = thumbnail_jpeg(row["image_path"], thumb_px, result_boxes(row, show_boxes))
        cells.append(f'<figure class="hit" data-product-id="{html.escape(str(row["product_id"]))}">{img_tag(jpeg)}'
                     f"<figcaption>{html.escape(caption(row))}</figcaption></figure>")
    query = f'<figure class="query">{img_tag(query_jpeg)}<figcaption>query</figcaption></figure>' if query_jpeg else ""
    metric_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                          for k, v in (metrics or {}).items())
    metrics_html = f"<h2>run metrics</h2><table>{metric_rows}</table>" if metric_rows else ""
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif}figure{margin:4px;width:%dpx;font-size:11px}"
        ".grid{display:grid;grid-template-columns:repeat(%d,%dpx);gap:6px}"
        "td{padding:1px 8px;font-size:12px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{query}<div class=\"grid\">{''.join(cells)}</div>{metrics_html}"
        "</body></html>\n"
    ) % (thumb_px, columns, thumb_px + 8)


def grid_figure(results: pd.DataFrame, title: str, query_image: Image.Image | None, show_boxes: bool,
                query_boxes: Sequence[Box] = (), columns: int = 6, thumb_px: int = 160) -> "Figure":
    """A static matplotlib figure of the query and its result grid (no pyplot state; Agg canvas)."""
    from matplotlib.figure import Figure

    n = len(results) + (1 if query_image is not None else 0)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows + 0.4), dpi=100)
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    panels: list[tuple[Image.Image, str]] = []
    if query_image is not None:
        panels.append((thumbnail(query_image, thumb_px, query_boxes if show_boxes else (), QUERY_BOX_COLOR), "query"))
    for row in results.to_dict("records"):
        jpeg = thumbnail_jpeg(row["image_path"], thumb_px, result_boxes(row, show_boxes))
        panels.append((Image.open(io.BytesIO(jpeg)),
                       f"#{int(row['rank'])} {row['product_id']}\n{row.get('category') or '?'}  {row['score']:.3f}"))
    for ax, (img, text) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(text, fontsize=7)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ExportPaths:
    png: Path
    html: Path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "query"


def export_grid(run_path: Path, results: pd.DataFrame, title: str, query_image: Image.Image | None,
                query_boxes: Sequence[Box], show_boxes: bool, columns: int = 6, thumb_px: int = 160,
                metrics: Mapping[str, Any] | None = None, name: str = "query") -> ExportPaths:
    """Write the grid as ``<run>/explore/<utc stamp>_<name>.png`` and ``.html``, atomically."""
    out_dir = Path(run_path) / EXPLORE_DIR
    stem = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}_{slug(name)}"
    fig = grid_figure(results, title, query_image, show_boxes, query_boxes, columns, thumb_px)
    png = out_dir / f"{stem}.png"
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    query_jpeg = image_jpeg(query_image, thumb_px, query_boxes if show_boxes else ()) if query_image else None
    page = write_text_atomic(out_dir / f"{stem}.html",
                             grid_html(results, title, query_jpeg, show_boxes, thumb_px, columns, metrics))
    log.info("exported %s and %s", png, page)
    return ExportPaths(png=png, html=page)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_html(frame: pd.DataFrame, max_rows: int = 50) -> str:
    return frame.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)


# ============================================================================================ widgets
class Explorer:
    """The ipywidgets UI over the model functions above. ``display(explorer.widget)`` in JupyterLab.

    Public state for tests and notebooks: ``run`` / ``compare_run`` (:class:`RunView`), ``query``,
    ``results`` / ``compare_table`` (DataFrames), ``compare_summary``, ``last_export``, ``last_error``,
    and the widgets themselves (``product``, ``random_button``, ``upload``, ``k``, ``search_k``, ``category``,
    ``in_stock``, ``show_boxes``, ``run_select``, ``compare_select``, ``export_button``, ``grid``,
    ``result_buttons``).
    """

    def __init__(self, cfg: ExploreConfig | None = None) -> None:
        import ipywidgets as w

        self.cfg = cfg or ExploreConfig()
        self._w = w
        self._rng = random.Random(self.cfg.seed)
        self._busy = 0
        self.device = self.cfg.device  # resolved (torch imported) only when an image query needs the models
        run_path = resolve_config_run(self.cfg)
        self.runs_root = run_path.parent
        self.run: RunView = load_run(run_path, self.device)
        compare_path = resolve_compare_run(run_path, self.cfg.compare_run_id)
        self.compare_run: RunView | None = load_run(compare_path, self.device) if compare_path else None
        self.query: Query | None = None
        self.query_boxes: list[Box] = []
        self.results: pd.DataFrame = pd.DataFrame(columns=list(RESULT_COLUMNS))
        self.compare_table: pd.DataFrame | None = None
        self.compare_summary: dict[str, float] | None = None
        self.last_export: ExportPaths | None = None
        self.last_error: str | None = None
        self.result_buttons: list[Any] = []
        self._build_widgets()
        self._refresh_metrics()
        first = self.cfg.query_product or random_product(self.run, self._rng, self.cfg.category)
        self.set_query(Query.product(first))

    # ------------------------------------------------------------------ layout
    def _build_widgets(self) -> None:
        w = self._w
        run_options = self._run_options()
        self.run_select = w.Dropdown(options=run_options, value=self.run.run_id, description="run")
        compare_value = self.compare_run.run_id if self.compare_run else NO_COMPARISON
        self.compare_select = w.Dropdown(options=[("(none)", NO_COMPARISON), *run_options], value=compare_value,
                                         description="compare")
        self.product = w.Combobox(options=self.run.product_ids, ensure_option=True, placeholder="product id",
                                  description="product")
        self.random_button = w.Button(description="random product", icon="random")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="query image")
        self.k = w.IntSlider(value=self.cfg.k, min=1, max=max(50, self.cfg.k), description="k")
        self.search_k = w.IntText(value=self.cfg.search_k, description="search_k")
        cat = self.cfg.category if self.cfg.category in self.run.categories else ALL_CATEGORIES
        self.category = w.Dropdown(options=[ALL_CATEGORIES, *self.run.categories], value=cat, description="category")
        self.in_stock = w.Checkbox(value=self.cfg.in_stock_only, description="in stock only")
        self.show_boxes = w.Checkbox(value=self.cfg.show_boxes, description="show boxes")
        self.export_button = w.Button(description="export PNG + HTML", icon="download")
        self.status = w.HTML()
        self.query_view = w.HTML()
        self.grid = w.GridBox(layout=w.Layout(
            grid_template_columns=f"repeat({self.cfg.columns}, {self.cfg.thumb_px + 16}px)", grid_gap="6px"))
        self.metrics_view = w.HTML()
        self.compare_view = w.HTML()

        self.product.observe(self._on_product, names="value")
        self.random_button.on_click(lambda _: self._guard(self.query_random))
        self.upload.observe(self._on_upload, names="value")
        for control in (self.k, self.search_k, self.category, self.in_stock, self.show_boxes):
            control.observe(lambda _change: self._guard(self.refresh), names="value")
        self.run_select.observe(lambda ch: self._guard(self.open_run, ch["new"]), names="value")
        self.compare_select.observe(lambda ch: self._guard(self.open_compare_run, ch["new"]), names="value")
        self.export_button.on_click(lambda _: self._guard(self.export))

        controls = w.VBox([
            w.HBox([self.run_select, self.compare_select]),
            w.HBox([self.product, self.random_button, self.upload]),
            w.HBox([self.k, self.search_k, self.category]),
            w.HBox([self.in_stock, self.show_boxes, self.export_button]),
            self.status,
        ])
        side = w.VBox([w.HTML("<b>run quality</b>"), self.metrics_view, w.HTML("<b>comparison</b>"), self.compare_view],
                      layout=w.Layout(width="420px", margin="0 0 0 12px"))
        self.widget = w.VBox([controls, w.HBox([w.VBox([self.query_view, self.grid]), side])])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _run_options(self) -> list[tuple[str, str]]:
        options = [(f"{r.run_id} · {r.status}", r.run_id) for r in explorable_runs(self.runs_root)]
        if self.run.run_id not in {v for _, v in options}:
            options.insert(0, (self.run.run_id, self.run.run_id))
        return options

    # ------------------------------------------------------------------ event plumbing
    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Widget updates inside do not each trigger a search."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a callback; show (and keep) a user-facing error instead of losing it in the widget log."""
        if self._busy:
            return
        try:
            fn(*args)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - every callback error must reach the user
            if not isinstance(exc, NiteruError):
                log.exception("explorer callback failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.status.value = f'<span style="color:#c00">{html.escape(self.last_error)}</span>'

    def _on_product(self, change: Mapping[str, Any]) -> None:
        value = str(change["new"] or "")
        if value and value in set(self.run.product_ids) and not (self.query and self.query.product_id == value):
            self._guard(self.set_query, Query.product(value))

    def _on_upload(self, change: Mapping[str, Any]) -> None:
        files = change["new"]
        if files:
            item = files[0]
            self._guard(self.query_by_image, bytes(item["content"]), str(item.get("name") or "upload"))

    # ------------------------------------------------------------------ actions (also the programmatic API)
    def params(self) -> SearchParams:
        category = "" if self.category.value == ALL_CATEGORIES else str(self.category.value)
        search_k = int(self.search_k.value)
        return SearchParams(k=int(self.k.value), search_k=search_k if search_k > 0 else None, category=category,
                            in_stock_only=bool(self.in_stock.value))

    def set_query(self, query: Query) -> None:
        self.query = query
        if query.kind == "product":
            with self._batch():
                self.product.value = query.product_id if query.product_id in set(self.run.product_ids) else ""
        self.refresh()

    def query_random(self) -> None:
        self.set_query(Query.product(random_product(self.run, self._rng, self.params().category)))

    def query_by_image(self, data: bytes, name: str = "upload") -> None:
        """Query with an image file's bytes (what the FileUpload widget delivers)."""
        self.set_query(Query.from_bytes(data, name=name))

    def open_run(self, run_id: str) -> None:
        if run_id == self.run.run_id:
            return
        self.run = load_run(resolve_run(self.runs_root, run_id), self.device)
        with self._batch():
            self.product.options = self.run.product_ids
            keep = self.category.value if self.category.value in self.run.categories else ALL_CATEGORIES
            self.category.options = [ALL_CATEGORIES, *self.run.categories]
            self.category.value = keep
        self._refresh_metrics()
        self.refresh()

    def open_compare_run(self, run_id: str) -> None:
        self.compare_run = load_run(resolve_run(self.runs_root, run_id), self.device) if run_id else None
        self._refresh_metrics()
        self._refresh_compare()

    def refresh(self) -> None:
        """Re-run the current query with the current controls and redraw everything."""
        if self.query is None:
            return
        params = self.params()
        self.results = search(self.run, self.query, params)
        self.query_boxes = self._query_boxes(self.run)
        self._draw_query()
        self._draw_grid()
        self._refresh_compare()
        self.status.value = (f"{len(self.results)} result(s) for {html.escape(self.query.label)} in run "
                             f"<code>{html.escape(self.run.run_id)}</code>")

    def export(self) -> ExportPaths:
        if self.query is None:
            raise ConfigError("nothing to export yet: pick a query first")
        self.last_export = export_grid(
            self.run.path, self.results, self.title(), self.query_image(), self.query_boxes,
            bool(self.show_boxes.value), self.cfg.columns, self.cfg.thumb_px, self.run.metrics,
            name=Path(self.query.name).stem if self.query.kind == "image" else self.query.name,
        )
        self.status.value = (f"exported <code>{html.escape(str(self.last_export.png))}</code> and "
                             f"<code>{html.escape(str(self.last_export.html))}</code>")
        return self.last_export

    def figure(self) -> "Figure":
        """The current grid as a static matplotlib figure (what the notebook keeps in its outputs)."""
        return grid_figure(self.results, self.title(), self.query_image(), bool(self.show_boxes.value),
                           self.query_boxes, self.cfg.columns, self.cfg.thumb_px)

    def png(self) -> bytes:
        """The static figure as PNG bytes (``IPython.display.Image(explorer.png())`` keeps it in a notebook)."""
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def title(self) -> str:
        p = self.params()
        label = self.query.label if self.query else "-"
        extras = [f"k={p.k}"] + ([f"category={p.category}"] if p.category else []) + \
                 (["in stock"] if p.in_stock_only else []) + ([f"search_k={p.search_k}"] if p.search_k else [])
        return f"run {self.run.run_id}: {label} ({', '.join(extras)})"

    def metrics_table(self) -> pd.DataFrame:
        """The run's quality metrics (and the compared run's, side by side, when one is open)."""
        if self.compare_run is None:
            return pd.DataFrame({"metric": list(self.run.metrics), "value": list(self.run.metrics.values())})
        table = compare_metrics(self.compare_run.metrics, self.run.metrics)  # delta = this run - the compared one
        return table.rename(columns={"a": self.compare_run.run_id, "b": self.run.run_id})

    # ------------------------------------------------------------------ drawing
    def query_image(self) -> Image.Image | None:
        if self.query is None:
            return None
        if self.query.image is not None:
            return self.query.image
        path = self.run.image_path(self.query.product_id)
        if path is None:
            return None
        from niteru.images import load_rgb

        return load_rgb(path)

    def _query_boxes(self, run: RunView) -> list[Box]:
        assert self.query is not None
        if self.query.kind == "product":
            return list(run.product_boxes(self.query.product_id))
        if not self.show_boxes.value:
            return []
        return query_vector(run, self.query)[1]

    def _draw_query(self) -> None:
        assert self.query is not None
        image = self.query_image()
        boxes = self.query_boxes if self.show_boxes.value else []
        img = ""
        if image is not None:
            data = base64.b64encode(image_jpeg(image, self.cfg.thumb_px, boxes)).decode()
            img = f'<img src="data:image/jpeg;base64,{data}" width="{self.cfg.thumb_px}"><br>'
        self.query_view.value = f"<div>{img}<b>query:</b> {html.escape(self.query.label)}</div>"

    def _draw_grid(self) -> None:
        w = self._w
        show = bool(self.show_boxes.value)
        cells, buttons = [], []
        for row in self.results.to_dict("records"):
            image = w.Image(value=thumbnail_jpeg(row["image_path"], self.cfg.thumb_px, result_boxes(row, show)),
                            format="jpeg", width=self.cfg.thumb_px)
            label = w.HTML(f'<div style="font-size:11px;line-height:1.2">{html.escape(caption(row))}</div>',
                           layout=w.Layout(width=f"{self.cfg.thumb_px}px"))
            button = w.Button(description="more like this", tooltip=str(row["product_id"]),
                              layout=w.Layout(width=f"{self.cfg.thumb_px}px"))
            button.product_id = str(row["product_id"])  # type: ignore[attr-defined]
            button.on_click(self._on_result_click)
            cells.append(w.VBox([image, label, button]))
            buttons.append(button)
        self.result_buttons = buttons
        self.grid.children = tuple(cells)

    def _on_result_click(self, button: Any) -> None:
        self._guard(self.set_query, Query.product(button.product_id))

    def _refresh_metrics(self) -> None:
        self.metrics_view.value = table_html(self.metrics_table()) if self.run.metrics else "<i>no metrics</i>"

    def _refresh_compare(self) -> None:
        if self.compare_run is None or self.query is None:
            self.compare_table, self.compare_summary = None, None
            self.compare_view.value = "<i>pick a second run to compare</i>"
            return
        query = self.query
        if query.kind == "product" and query.product_id not in set(self.compare_run.product_ids):
            image = self.query_image()  # e.g. a product new today: embed its photo with the other run's models
            if image is not None:
                query = Query("image", product_id=query.product_id, image=image, name=query.product_id)
        params = self.params()
        if params.category and params.category not in self.compare_run.categories:
            params = SearchParams(params.k, params.search_k, "", params.in_stock_only)
        try:
            other = search(self.compare_run, query, params)
        except NiteruError as exc:
            self.compare_table, self.compare_summary = None, None
            self.compare_view.value = f"<i>run {html.escape(self.compare_run.run_id)}: {html.escape(str(exc))}</i>"
            return
        self.compare_summary, self.compare_table = compare_results(self.results, other)
        s = self.compare_summary
        head = (f"a = <code>{html.escape(self.run.run_id)}</code>, b = <code>{html.escape(self.compare_run.run_id)}"
                f"</code>: overlap {s['overlap']:.2f}, jaccard {s['jaccard']:.2f}, mean score "
                f"{s['mean_score_a']:.3f} / {s['mean_score_b']:.3f}")
        self.compare_view.value = f"<div>{head}</div>{table_html(self.compare_table)}"
