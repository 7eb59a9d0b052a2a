"""Alerts against a real loopback HTTP receiver: delivery, retries, timeouts, chain hooks and the SLA check."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from niteru import alerts, runs
from niteru.chain import ChainRunner, Stage
from niteru.errors import ConfigError

from loopback import LoopbackServer, QuietHandler


class Receiver:
    """A Slack-like webhook endpoint on 127.0.0.1; ``script`` gives (status, delay_s) per request, then 200."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.script: list[tuple[int, float]] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, delay = receiver.script.pop(0) if receiver.script else (200, 0.0)
                receiver.paths.append(self.path)
                receiver.bodies.append(json.loads(body))
                time.sleep(delay)
                try:
                    self.send_body(status, b"ok" if status == 200 else b"invalid_payload", "text/plain")
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = LoopbackServer(Handler, "/services/T000/B000/secret").start()
        self.url = self.server.url

    def close(self) -> None:
        self.server.stop()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def test_post_delivers_slack_json(receiver: Receiver) -> None:
    msg = alerts.slack_message("hello", {"run": "r1", "empty": None})
    assert alerts.post_webhook(receiver.url, msg) == 200
    assert receiver.paths == ["/services/T000/B000/secret"]
    assert receiver.bodies[0]["text"] == "hello\nrun: r1"
    assert receiver.bodies[0]["blocks"][0]["text"]["text"] == "*hello*"


def test_retries_5xx_and_429_then_succeeds(receiver: Receiver) -> None:
    receiver.script = [(503, 0.0), (429, 0.0)]
    assert alerts.post_webhook(receiver.url, {"text": "x"}, attempts=3, backoff_s=0.01) == 200
    assert len(receiver.bodies) == 3


def test_gives_up_after_attempts_and_does_not_retry_4xx(receiver: Receiver) -> None:
    receiver.script = [(500, 0.0)] * 5
    with pytest.raises(alerts.WebhookError, match="HTTP 500") as err:
        alerts.post_webhook(receiver.url, {"text": "x"}, attempts=2, backoff_s=0.01)
    assert "secret" not in str(err.value)  # the webhook path is a credential
    assert len(receiver.bodies) == 2
    receiver.script = [(400, 0.0)]
    with pytest.raises(alerts.WebhookError, match="HTTP 400"):
        alerts.post_webhook(receiver.url, {"text": "x"}, attempts=3, backoff_s=0.01)
    assert len(receiver.bodies) == 3  # one more request, no retries


def test_timeout_is_bounded(receiver: Receiver) -> None:
    receiver.script = [(200, 1.5), (200, 1.5)]
    t0 = time.perf_counter()
    with pytest.raises(alerts.WebhookError, match="unreachable after 2 attempt"):
        alerts.post_webhook(receiver.url, {"text": "slow"}, timeout=0.3, attempts=2, backoff_s=0.01)
    assert time.perf_counter() - t0 < 1.5


def test_unreachable_webhook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    alerter = alerts.WebhookAlerter(url="http://127.0.0.1:9/hook", attempts=1, timeout=0.5)
    assert alerter.notify({"text": "x"}) is False
    assert "could not deliver alert" in caplog.text


def test_url_from_env_and_event_selection(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
    monkeypatch.setenv(alerts.EVENTS_ENV, "stage_failed,run_succeeded")
    alerter = alerts.WebhookAlerter()
    assert alerter.url == receiver.url and alerter.events == {"stage_failed", "run_succeeded"}
    alerter({"event": "stage_started", "run_id": "r", "stage": "embed"})
    alerter({"event": "run_succeeded", "run_id": "r", "status": "succeeded"})
    assert [b["text"].splitlines()[0] for b in receiver.bodies] == [":white_check_mark: niteru run r succeeded"]
    with pytest.raises(ConfigError, match="unknown alert event"):
        alerts.WebhookAlerter(events={"stage_exploded"})
    monkeypatch.delenv(alerts.WEBHOOK_ENV)
    assert not alerts.WebhookAlerter().enabled


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir: str = "runs/dev"  # run folder\nseed: int = 0  # seed')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_chain_runner_hook_names_the_failed_gate(receiver: Receiver, tmp_path: Path) -> None:
    """A real papermill run through ChainRunner: one stage succeeds, the gate stage fails -> one alert."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_ok.ipynb", "from niteru.runs import write_stage_summary\n"
                                   "write_stage_summary(run_dir + '/ok', metrics={'n': 3})")
    _notebook(nbs / "02_gate.ipynb", "from niteru.errors import GateFailed\n"
                                     "raise GateFailed('recall_at_10', '0.41 < 0.60')")
    chain = (Stage("ok", "01_ok.ipynb", "niteru.config:StageConfig"),
             Stage("gate", "02_gate.ipynb", "niteru.config:StageConfig", ("ok",)))
    alerter = alerts.WebhookAlerter(url=receiver.url)
    runner = ChainRunner(runs_root=tmp_path / "runs", notebooks_dir=nbs, chain=chain, hooks=[alerter])
    result = runner.run({"seed": 1}, run_id="r-gate")
    assert result.status == runs.STATUS_FAILED
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["text"].startswith(":no_entry: niteru quality gate 'recall_at_10' failed in run r-gate")
    assert "gate: recall_at_10" in body["text"] and "stage: gate" in body["text"]
    assert "0.41 < 0.60" in body["text"]
    assert alerter.sent == receiver.bodies


def test_format_event_plain_stage_failure() -> None:
    msg = alerts.format_event({"event": "stage_failed", "run_id": "r9", "stage": "embed",
                               "error": "stage 'embed' failed in cell 3: RuntimeError: CUDA out of memory"})
    assert msg["text"].splitlines()[0] == ":x: niteru stage 'embed' failed in run r9"
    assert "gate:" not in msg["text"]


class _TI:
    dag_id, task_id, try_number, log_url = "niteru_chain", "evaluate", 2, "http://airflow/log"

    def xcom_pull(self, task_ids: str) -> str:
        assert task_ids == "init_run"
        return "/data/runs/20261103-000000-abcd"


def test_airflow_failure_callback(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
    from niteru.errors import StageError

    exc = StageError("stage 'evaluate' failed in cell 4: GateFailed: quality gate 'catalog_coverage' failed: 0.8")
    alerts.airflow_failure_callback({"ti": _TI(), "exception": exc})
    text = receiver.bodies[0]["text"]
    assert text.startswith(":no_entry: niteru quality gate 'catalog_coverage' failed in run 20261103-000000-abcd")
    assert "dag id: niteru_chain" in text and "try number: 2" in text


# ------------------------------------------------------------------------------------ SLA
def _run(root: Path, run_id: str, started: str, ended: str | None, status: str) -> None:
    runs.save_manifest(root / run_id, {"run_id": run_id, "status": status, "started_at": started,
                                       "ended_at": ended, "stages": {}})


def test_sla_states(tmp_path: Path, receiver: Receiver) -> None:
    root = tmp_path / "runs"
    alerter = alerts.WebhookAlerter(url=receiver.url)
    # day before: succeeded (outside today's window, must not count)
    _run(root, "20261102-000000-aaaa", "2026-11-02T00:00:00+00:00", "2026-11-02T01:00:00+00:00", "succeeded")
    missed = alerts.check_sla(root, "06:00", "2026-11-03T06:30:00+00:00", alerter=alerter)
    assert (missed.state, missed.ok, missed.run_id) == ("missed", False, None)
    assert "no run started" in missed.message
    assert len(receiver.bodies) == 1 and "SLA missed" in receiver.bodies[0]["text"]

    _run(root, "20261103-000000-bbbb", "2026-11-03T00:00:00+00:00", None, "running")
    pending = alerts.check_sla(root, "06:00", "2026-11-03T05:00:00+00:00", alerter=alerter)
    assert (pending.state, pending.ok, pending.run_id) == ("pending", True, "20261103-000000-bbbb")
    late = alerts.check_sla(root, "06:00", "2026-11-03T06:01:00+00:00", alerter=alerter)
    assert (late.state, late.run_status) == ("missed", "running")

    _run(root, "20261103-000000-bbbb", "2026-11-03T00:00:00+00:00", "2026-11-03T04:10:00+00:00", "failed")
    _run(root, "20261103-043000-cccc", "2026-11-03T04:30:00+00:00", "2026-11-03T05:40:00+00:00", "succeeded")
    met = alerts.check_sla(root, dt.time(6, 0), dt.datetime(2026, 11, 3, 7, 0, tzinfo=dt.timezone.utc),
                           alerter=alerter)
    assert (met.state, met.ok, met.run_id) == ("met", True, "20261103-043000-cccc")
    assert len(receiver.bodies) == 2  # only the two misses alerted

    _run(root, "20261103-043000-cccc", "2026-11-03T04:30:00+00:00", "2026-11-03T06:20:00+00:00", "succeeded")
    assert alerts.check_sla(root, "06:00", "2026-11-03T07:00:00+00:00", alerter=alerter).state == "missed"


def test_sla_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    root = tmp_path / "runs"
    _run(root, "20261103-000000-bbbb", "2026-11-03T00:00:00+00:00", "2026-11-03T01:00:00+00:00", "succeeded")
    args = ["sla", "--runs-root", str(root), "--deadline", "6:00"]
    assert alerts.main([*args, "--now", "2026-11-03T06:30:00+00:00"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "met"
    assert alerts.main([*args, "--now", "2026-11-04T06:30:00+00:00"]) == 1
    assert json.loads(capsys.readouterr().out)["state"] == "missed"
    with pytest.raises(ConfigError, match="cannot parse time"):
        alerts.main([*args, "--now", "yesterday"])
