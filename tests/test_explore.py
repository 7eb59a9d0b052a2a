"""niteru.explore: the model functions on tiny tables, and the ipywidgets Explorer driven programmatically
(no browser) against real tiny runs produced by the chain; the notebook rendered headless with papermill."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from PIL import Image

from niteru import explore
from niteru.explore import ExploreConfig, Query

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


# ============================================================================================ pure model
def _results(ids: list[str], scores: list[float], image_path: str | None = None) -> pd.DataFrame:
    rows = [{"rank": i + 1, "product_id": pid, "crop_index": 0, "score": s, "category": "dress", "brand": "Kumo",
             "price": 10.0 + i, "in_stock": True, "image_path": image_path, "x0": 8.0, "y0": 8.0, "x1": 40.0,
             "y1": 56.0} for i, (pid, s) in enumerate(zip(ids, scores))]
    return pd.DataFrame(rows, columns=list(explore.RESULT_COLUMNS))


def test_compare_results_counts_overlap_and_ranks():
    a = _results(["p1", "p2", "p3", "p4"], [0.9, 0.8, 0.7, 0.6])
    b = _results(["p3", "p1", "p9", "p8"], [0.95, 0.85, 0.5, 0.4])
    summary, merged = explore.compare_results(a, b)
    assert summary["overlap"] == pytest.approx(0.5)  # p1, p3 shared out of 4
    assert summary["jaccard"] == pytest.approx(2 / 6)
    assert summary["mean_score_a"] == pytest.approx(0.75)
    assert summary["mean_score_b"] == pytest.approx(0.675)
    assert merged["product_id"].tolist() == ["p1", "p2", "p3", "p4", "p9", "p8"]
    row = merged.set_index("product_id").loc["p3"]
    assert (row["rank_a"], row["rank_b"]) == (3, 1)
    assert math.isnan(merged.set_index("product_id").loc["p9", "rank_a"])


def test_metrics_flattened_and_compared():
    flat = explore.flatten_metrics({"recall@10": 0.9, "category": {"p@5": 0.8, "per_class": [1, 2]}, "ok": True})
    assert flat == {"recall@10": 0.9, "category.p@5": 0.8, "ok": True}
    table = explore.compare_metrics({"a": 0.5, "s": "x"}, {"a": 0.75, "n": 3}).set_index("metric")
    assert table.loc["a", "delta"] == pytest.approx(0.25)
    assert pd.isna(table.loc["s", "delta"]) and pd.isna(table.loc["n", "delta"])


def test_thumbnail_draws_the_box_where_it_belongs():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    out = explore.draw_boxes(img, [(10.0, 10.0, 60.0, 40.0)])
    assert out.getpixel((10, 25)) == explore.BOX_COLOR  # left edge
    assert out.getpixel((35, 25)) == (255, 255, 255)  # inside stays untouched
    assert img.getpixel((10, 25)) == (255, 255, 255)  # the input is not modified
    thumb = explore.thumbnail(img, 64)
    assert thumb.size == (64, 64)


def test_export_writes_png_and_html_atomically(tmp_path: Path):
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(photo)
    results = _results(["p1", "p2", "p3"], [0.9, 0.8, 0.7], image_path=str(photo))
    paths = explore.export_grid(tmp_path / "run", results, "run x: product p0", Image.new("RGB", (64, 64)),
                                [(0.0, 0.0, 32.0, 32.0)], show_boxes=True, columns=2, thumb_px=64,
                                metrics={"recall@10": 0.875}, name="p0")
    assert paths.png.parent == tmp_path / "run" / "explore" and paths.png.name.endswith("_p0.png")
    with Image.open(paths.png) as png:
        assert png.format == "PNG" and png.width > 100
    page = paths.html.read_text()
    assert page.count('class="hit"') == 3 and 'data-product-id="p2"' in page
    assert "score 0.800" in page and "recall@10" in page and "0.875" in page
    assert sorted(p.name for p in (tmp_path / "run" / "explore").iterdir()) == sorted([paths.png.name, paths.html.name])


def test_resolve_run_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(explore.ConfigError, match="no successful run with an index"):
        explore.resolve_run(tmp_path)
    with pytest.raises(explore.ConfigError, match="run 'nope' not found"):
        explore.resolve_run(tmp_path, "nope")


def test_config_run_id_is_the_parameter_not_the_run_dir_name():
    cfg = ExploreConfig(run_id="20260101-000000-aaaa", run_dir="")
    assert cfg.run_id == "20260101-000000-aaaa"
    assert ExploreConfig().run_id == ""
    with pytest.raises(explore.ConfigError, match="unknown parameter 'kk'"):
        ExploreConfig.from_params({"kk": 3})
