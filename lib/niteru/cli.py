"""``niteru`` command line: run the chain, run the demo, list runs."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from niteru.errors import NiteruError

log = logging.getLogger("niteru")

DEFAULT_RUNS_ROOT = os.environ.get("NITERU_RUNS_ROOT", "runs")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _literal(text: str) -> Any:
    """Parse a ``--set`` value as JSON when it is JSON (numbers, booleans, lists), else keep the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``key=value`` goes to every stage that has ``key``; ``stage.key=value`` to one stage."""
    common: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value or stage.key=value, got {item!r}", param_hint="--set")
        stage, dot, name = key.partition(".")
        if dot:
            stages.setdefault(stage, {})[name] = _literal(value)
        else:
            common[key] = _literal(value)
    return common, stages


def load_config_file(path: Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A JSON or YAML file ``{"common": {...}, "stages": {"extract": {...}, ...}}``."""
    if path is None:
        return {}, {}
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    unknown = set(data) - {"common", "stages"}
    if unknown:
        raise NiteruError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected 'common' and 'stages'")
    return dict(data.get("common") or {}), {k: dict(v) for k, v in (data.get("stages") or {}).items()}


def _hooks() -> list:
    hooks = []
    if os.environ.get("NITERU_ALERT_WEBHOOK"):
        from niteru.alerts import webhook_hook_from_env

        hooks.append(webhook_hook_from_env())
    return hooks


def _runner(runs_root: str, log_output: bool = False):
    from niteru.chain import ChainRunner

    return ChainRunner(runs_root=Path(runs_root), log_output=log_output, hooks=_hooks())


def _report(result) -> None:
    click.echo(f"run {result.run_id}: {result.status} in {result.manifest.get('duration_s')}s -> {result.run_dir}")
    for name, stage in result.manifest["stages"].items():
        reused = " (reused)" if stage.get("reused") else ""
        click.echo(f"  {name:<9} {stage['status']:<10} {stage.get('duration_s', '-')!s:>8}s{reused}")
    if result.error:
        click.echo(f"error: {result.error}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """niteru: catalog -> visual similar-item search, as a reproducible papermill chain."""
    _setup_logging(verbose)


@cli.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON/YAML file with 'common' and per-stage 'stages' parameters")
@click.option("--set", "assignments", multiple=True, metavar="[STAGE.]KEY=VALUE",
              help="override a parameter (repeatable); values are JSON literals or strings")
@click.option("--run-id", default=None, help="run id (default: timestamp-based)")
@click.option("--until", default=None, help="stop after this stage")
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="continue RUN_ID from its first incomplete stage (finished stages are verified by checksum); "
                   "--set overrides re-run the stages they change, e.g. --set extract.retry_failed=true")
@click.option("--runs-root", default=DEFAULT_RUNS_ROOT, show_default=True)
@click.option("--log-output", is_flag=True, help="stream notebook output to the log")
def run(config_file: Path | None, assignments: tuple[str, ...], run_id: str | None, until: str | None,
        resume_id: str | None, runs_root: str, log_output: bool) -> None:
    """Run the chain (extract -> detect -> embed -> index -> evaluate -> package)."""
    runner = _runner(runs_root, log_output)
    common, stages = load_config_file(config_file)
    c2, s2 = parse_assignments(assignments)
    common.update(c2)
    for name, values in s2.items():
        stages.setdefault(name, {}).update(values)
    if resume_id:
        if until or run_id:
            raise click.UsageError("--resume continues an existing run: drop --until/--run-id")
        result = runner.resume(resume_id, common, stages)
    else:
        result = runner.run(common, stages, run_id=run_id, until=until)
    _report(result)
    if not result.ok:
        click.echo(f"resume with: niteru run --resume {result.run_id} --runs-root {runs_root}", err=True)
        sys.exit(1)


@cli.command()
@click.option("--products", default=500, show_default=True, help="demo catalog size (products)")
@click.option("--variants", default=2, show_default=True, help="photos per product")
@click.option("--runs-root", default=DEFAULT_RUNS_ROOT, show_default=True)
@click.option("--run-id", default=None)
@click.option("--set", "assignments", multiple=True, metavar="[STAGE.]KEY=VALUE", help="extra overrides")
def demo(products: int, variants: int, runs_root: str, run_id: str | None, assignments: tuple[str, ...]) -> None:
    """Generate the demo catalog and run the whole chain on it, then print how to serve and query it."""
    common, stages = parse_assignments(assignments)
    extract = stages.setdefault("extract", {})
    extract.setdefault("source", f"demo:n={products},v={variants}")
    result = _runner(runs_root).run(common, stages, run_id=run_id)
    _report(result)
    if not result.ok:
        click.echo(f"resume with: niteru run --resume {result.run_id} --runs-root {runs_root}", err=True)
        sys.exit(1)
    click.echo(serve_instructions(result.run_dir))


def serve_instructions(run_dir: Path) -> str:
    """How to serve the bento a run built, with working curl examples."""
    import mimetypes

    import pandas as pd

    package = json.loads((run_dir / "package" / "package.json").read_text())
    idmap = pd.read_parquet(run_dir / "index" / "idmap.parquet")
    first = idmap.iloc[0]
    product = str(first["product_id"])
    uri = str(first.get("image_uri", ""))
    image = uri if Path(uri).is_file() else str(first.get("image_path", "<photo.jpg>"))
    content_type = mimetypes.guess_type(uri)[0] or "image/jpeg"
    tag = package["bento_tag"]
    return "\n".join([
        "",
        "Serve the search service (from the repository root, after `source .venv/bin/activate`):",
        f"  bentoml serve {tag} --port 3000",
        f"  # or from source: NITERU_MODEL_TAG={package['model_tag']} bentoml serve --working-dir bentos/niteru_search --port 3000",
        "Query it from another shell:",
        "  curl -s -X POST http://127.0.0.1:3000/search_by_product -H 'Content-Type: application/json' "
        f"-d '{{\"product_id\": \"{product}\", \"k\": 5}}'",
        f"  curl -s -X POST http://127.0.0.1:3000/search_by_image -F 'image=@{image};type={content_type}' -F k=5",
        "",
    ])


@cli.command("runs")
@click.option("--runs-root", default=DEFAULT_RUNS_ROOT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_runs_cmd(runs_root: str, as_json: bool) -> None:
    """List runs with their status and key metrics."""
    from niteru.runs import list_runs

    infos = list_runs(runs_root)
    if as_json:
        click.echo(json.dumps([{"run_id": i.run_id, "status": i.status, "started_at": i.started_at,
                                "duration_s": i.duration_s, "source": i.source, "metrics": i.metrics}
                               for i in infos], indent=2, default=str))
        return
    if not infos:
        click.echo(f"no runs in {runs_root}")
        return
    keys = ("n_items", "recall@10", "precision@10", "instance_recall@10")
    click.echo(f"{'run_id':<22} {'status':<10} {'dur_s':>7}  " + "  ".join(f"{k:>18}" for k in keys) + "  source")
    for info in infos:
        vals = "  ".join(f"{_fmt(info.metrics.get(k)):>18}" for k in keys)
        click.echo(f"{info.run_id:<22} {info.status:<10} {_fmt(info.duration_s):>7}  {vals}  {info.source or ''}")


@cli.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sla(args: tuple[str, ...]) -> None:
    """Check that today's run succeeded by a deadline; alert and exit 1 if not (options: `niteru sla --help`)."""
    from niteru.alerts import main as alerts_main

    sys.exit(alerts_main(["sla", *args]))


@cli.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def dag(args: tuple[str, ...]) -> None:
    """Airflow DAG tools: `niteru dag show [--validate]`, `niteru dag run-stage ...` (docs/airflow.md)."""
    from niteru.airflow_dag import main as dag_main

    sys.exit(dag_main(list(args)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1000 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="niteru", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except NiteruError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
