"""niteru.explore: the model functions on tiny tables, and the ipywidgets Explorer driven programmatically
(no browser) against real tiny runs produced by the chain; the notebook rendered headless with papermill."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import nbformat
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


# ============================================================================================ real tiny runs
N_PRODUCTS, VARIANTS = 16, 2


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real chain runs over one tiny demo catalog (16 products x 2 photos, 2 of them out of stock): an older
    one with a 16-d PCA projection that stops after index, and the latest one up to evaluate with raw features.
    Both index out-of-stock products too, so the in-stock control has something to filter."""
    from niteru.chain import ChainRunner, raise_for_result

    root = tmp_path_factory.mktemp("explore-runs")
    runner = ChainRunner(runs_root=root)
    common = {"seed": 0, "device": "cpu"}
    stages = {  # the smallest settings that still exercise every stage
        "extract": {"source": f"demo:n={N_PRODUCTS},v={VARIANTS}"},
        "detect": {"audit_n": 0},
        "embed": {"num_workers": 0},
        "index": {"in_stock_only": False, "n_trees": 8},
        "evaluate": {"compare_run": "none", "sweep_n_trees": [8], "sweep_search_k": [-1]},
    }
    old_stages = {**{k: v for k, v in stages.items() if k != "evaluate"}, "embed": {"num_workers": 0, "pca_dim": 16}}
    raise_for_result(runner.run(common, old_stages, run_id="20260101-000000-old0", until="index"))
    raise_for_result(runner.run(common, stages, run_id="20260102-000000-new0", until="evaluate"))
    return root


@pytest.fixture()
def explorer(runs_root: Path) -> explore.Explorer:
    return explore.Explorer(ExploreConfig(runs_root=str(runs_root), k=6, device="cpu"))


def _captions(ex: explore.Explorer) -> list[str]:
    return [cell.children[1].value for cell in ex.grid.children]


def _upload(ex: explore.Explorer, data: bytes, name: str) -> None:
    import datetime as dt

    ex.upload.value = ({"name": name, "type": "image/jpeg", "size": len(data), "content": memoryview(data),
                        "last_modified": dt.datetime.now(dt.timezone.utc)},)


@pytest.mark.slow
def test_opens_latest_successful_run_compares_with_previous_and_shows_metrics(explorer: explore.Explorer,
                                                                              runs_root: Path):
    ex = explorer
    assert ex.last_error is None
    assert ex.run.run_id == "20260102-000000-new0" and ex.compare_run.run_id == "20260101-000000-old0"
    assert ex.run_select.value == "20260102-000000-new0" and ex.compare_select.value == "20260101-000000-old0"
    assert len(ex.run.product_ids) == N_PRODUCTS * VARIANTS
    # the displayed grid is the results table: one cell per result, caption = id, category, score
    assert len(ex.results) == 6 and len(ex.grid.children) == 6
    assert ex.query.product_id not in set(ex.results["product_id"])
    assert ex.results["score"].is_monotonic_decreasing
    for caption, row in zip(_captions(ex), ex.results.itertuples()):
        assert row.product_id in caption and row.category in caption and f"score {row.score:.3f}" in caption
    # side panel: the run's own evaluate metrics, and a comparison against the older run
    metrics = json.loads((runs_root / ex.run.run_id / "evaluate" / "metrics.json").read_text())
    flat = explore.flatten_metrics(metrics)
    table = ex.metrics_table().set_index("metric")
    some = next(k for k, v in flat.items() if isinstance(v, float))
    assert table.loc[some, ex.run.run_id] == pytest.approx(flat[some])
    assert some in ex.metrics_view.value
    shared = set(ex.compare_table.dropna()["product_id"])
    assert ex.compare_summary["overlap"] == pytest.approx(len(shared) / 6)
    assert ex.compare_table["product_id"].nunique() == len(ex.compare_table)


@pytest.mark.slow
def test_controls_filter_and_resize_the_grid(explorer: explore.Explorer):
    ex = explorer
    ex.k.value = 3
    assert len(ex.results) == 3 and len(ex.grid.children) == 3
    ex.k.value = ex.k.max  # 50 > the 31 other products
    ex.in_stock.value = False
    everything = ex.results
    assert len(everything) == N_PRODUCTS * VARIANTS - 1  # all other products, nothing filtered
    out_of_stock = set(everything.loc[~everything["in_stock"].astype(bool), "product_id"])
    assert out_of_stock, "the demo catalog has out-of-stock products"
    ex.in_stock.value = True
    assert not set(ex.results["product_id"]) & out_of_stock
    assert len(ex.results) == len(everything) - len(out_of_stock)
    category = ex.run.categories[1]
    ex.category.value = category
    assert len(ex.results) >= 1 and set(ex.results["category"]) == {category}
    assert all(category in c for c in _captions(ex))
    ex.search_k.value = 5  # tiny search_k: the engine's exact fallback still fills the filtered list
    assert set(ex.results["category"]) == {category} and ex.last_error is None


@pytest.mark.slow
def test_click_product_box_and_random_set_the_query(explorer: explore.Explorer, runs_root: Path):
    ex = explorer
    target = ex.results["product_id"].iloc[2]
    ex.result_buttons[2].click()
    assert ex.query == Query.product(target) and ex.product.value == target
    assert target not in set(ex.results["product_id"])
    other = next(p for p in ex.run.product_ids if p != target)
    ex.product.value = other
    assert ex.query.product_id == other and other not in set(ex.results["product_id"])
    # random is seeded: a second explorer with the same seed draws the same products
    ex.random_button.click()
    twin = explore.Explorer(ExploreConfig(runs_root=str(runs_root), k=6, device="cpu"))
    twin.random_button.click()
    assert ex.query.product_id == twin.query.product_id in set(ex.run.product_ids)


@pytest.mark.slow
def test_show_boxes_draws_the_matched_crop(explorer: explore.Explorer):
    ex = explorer
    ex.show_boxes.value = False
    plain = [c.children[0].value for c in ex.grid.children]
    ex.show_boxes.value = True
    boxed = [c.children[0].value for c in ex.grid.children]
    drawn = [a != b for a, b in zip(plain, boxed)]
    has_box = ~ex.results[list(explore.BOX_COLUMNS)].isna().any(axis=1)
    assert drawn == has_box.tolist() and any(drawn)


@pytest.mark.slow
def test_uploaded_catalog_photo_finds_itself_with_the_runs_own_models(explorer: explore.Explorer):
    ex = explorer
    pid = ex.run.product_ids[3]
    _upload(ex, Path(ex.run.image_path(pid)).read_bytes(), "shot.jpg")
    assert ex.last_error is None, ex.last_error
    assert ex.query.kind == "image" and ex.query.name == "shot.jpg"
    assert ex.results["product_id"].iloc[0] == pid
    assert ex.results["score"].iloc[0] > 0.99  # detect + crop + embed reproduce the indexed vector
    assert ex.query_boxes and "shot.jpg" in ex.query_view.value
    # the comparison embeds the same upload with the older run's own (PCA) embedder
    assert ex.compare_table is not None and ex.compare_table["rank_b"].notna().any()
    _upload(ex, b"not an image at all", "notes.txt")
    assert "BadImageError" in ex.last_error and "not a recognised image format" in ex.status.value
    assert ex.query.name == "shot.jpg"  # the previous query stays


@pytest.mark.slow
def test_switching_runs_and_turning_the_comparison_off(explorer: explore.Explorer):
    ex = explorer
    ex.compare_select.value = ""
    assert ex.compare_run is None and ex.compare_table is None and "pick a second run" in ex.compare_view.value
    query = ex.query
    ex.run_select.value = "20260101-000000-old0"
    assert ex.run.run_id == "20260101-000000-old0" and ex.query == query and ex.last_error is None
    assert len(ex.results) == 6 and ex.run.index.dim == 16  # the old run's PCA-16 vectors answered


@pytest.mark.slow
def test_export_button_writes_the_grid_into_the_run_folder(explorer: explore.Explorer, runs_root: Path):
    ex = explorer
    ex.export_button.click()
    assert ex.last_error is None
    paths = ex.last_export
    assert paths.png.parent == runs_root / ex.run.run_id / "explore"
    with Image.open(paths.png) as png:
        assert png.format == "PNG"
    page = paths.html.read_text()
    assert page.count('class="hit"') == len(ex.results)
    for pid in ex.results["product_id"]:
        assert f'data-product-id="{pid}"' in page
    assert str(paths.png) in ex.status.value


@pytest.mark.slow
def test_notebook_renders_headless_with_its_defaults(runs_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NITERU_RUNS", str(runs_root))  # the default runs_root='' reads it
    out = tmp_path / "explore.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
    with Image.open(io.BytesIO(base64.b64decode(pngs[0]))) as fig:
        assert fig.width >= 6 * 150  # one query + 12 results, 6 per row
    tables = [o["data"]["text/html"] for o in outputs if "<table" in o.get("data", {}).get("text/html", "")]
    body = tables[0].split("<tbody>")[1]
    shown = re.findall(r"<td>([A-Z]\d{5}-v\d)</td>", body)
    assert len(shown) == 12  # k=12 results of the latest run
    latest = pd.read_parquet(runs_root / "20260102-000000-new0" / "index" / "idmap.parquet")
    assert set(shown) <= set(latest["product_id"])


@pytest.mark.slow
def test_a_product_searched_by_its_photo_excludes_itself(explorer: explore.Explorer):
    """How a product missing from the compared run is searched there: its photo through that run's models."""
    from niteru.images import load_rgb

    ex = explorer
    pid = ex.run.product_ids[4]
    sibling = pid[:-1] + ("1" if pid.endswith("0") else "0")  # the other photo of the same product
    query = Query("image", product_id=pid, image=load_rgb(ex.run.image_path(pid)), name=pid)
    table = explore.search(ex.compare_run, query, explore.SearchParams(k=10, in_stock_only=False))
    assert len(table) == 10 and pid not in set(table["product_id"]) and sibling in set(table["product_id"])
