"""Operational alerts: a Slack-compatible webhook poster, chain/Airflow failure hooks and a daily SLA check.

* :class:`WebhookAlerter` is a :class:`niteru.chain.ChainRunner` hook (``ChainRunner(hooks=[WebhookAlerter()])``)
  and, through :func:`airflow_failure_callback`, an Airflow ``on_failure_callback``. Stage and gate failures are
  posted as Slack-compatible JSON (``{"text": ..., "blocks": [...]}``); a failed quality gate is named.
* :func:`check_sla` alerts when the latest run of a day has not succeeded by a deadline;
  ``python -m niteru.alerts sla --runs-root runs --deadline 06:00`` is the CLI entry point (exit code 1 on a miss).

The webhook URL comes from the environment variable ``NITERU_ALERT_WEBHOOK`` (or an explicit argument), never
from a notebook parameter: it is a secret and must not end up in executed notebooks or manifests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from niteru import runs
from niteru.errors import ConfigError

log = logging.getLogger(__name__)

WEBHOOK_ENV = "NITERU_ALERT_WEBHOOK"
EVENTS_ENV = "NITERU_ALERT_EVENTS"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_ATTEMPTS = 3
#: Chain events that post a message by default. ``run_failed`` always follows a ``stage_failed``
#: in the local runner, so posting both would double every alert.
DEFAULT_EVENTS = frozenset({"stage_failed"})
ALL_EVENTS = frozenset({"run_started", "stage_started", "stage_succeeded", "stage_failed", "run_succeeded",
                        "run_failed"})

_GATE_RE = re.compile(r"quality gate '([^']+)' failed")


class WebhookError(RuntimeError):
    """The webhook could not be reached or answered with an error after all retries."""


# ------------------------------------------------------------------------------------ formatting
def gate_name(error: str | None) -> str | None:
    """The failing quality gate named in an error message (``GateFailed``), else ``None``."""
    if not error:
        return None
    match = _GATE_RE.search(error)
    return match.group(1) if match else None


def slack_message(title: str, fields: Mapping[str, Any], detail: str | None = None) -> dict[str, Any]:
    """A Slack-compatible payload: ``text`` (fallback, also read by Mattermost/Teams-style receivers) + blocks."""
    shown = {k: v for k, v in fields.items() if v not in (None, "")}
    lines = [title, *(f"{k}: {v}" for k, v in shown.items())]
    if detail:
        lines.append(detail)
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*"}}]
    if shown:
        blocks.append({"type": "section",
                       "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in list(shown.items())[:10]]})
    if detail:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"```{detail[:2800]}```"}})
    return {"text": "\n".join(lines), "blocks": blocks}


def format_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a ChainRunner event dict into a Slack-compatible message; gate failures are called out."""
    name = str(event.get("event", "event"))
    stage = event.get("stage")
    error = event.get("error")
    gate = gate_name(error)
    if gate:
        title = f":no_entry: niteru quality gate '{gate}' failed in run {event.get('run_id')}"
    elif name == "stage_failed":
        title = f":x: niteru stage '{stage}' failed in run {event.get('run_id')}"
    elif name == "run_failed":
        title = f":x: niteru run {event.get('run_id')} failed"
    elif name == "run_succeeded":
        title = f":white_check_mark: niteru run {event.get('run_id')} succeeded"
    else:
        title = f"niteru {name.replace('_', ' ')}: run {event.get('run_id')}" + (f" stage {stage}" if stage else "")
    fields = {"event": name, "run": event.get("run_id"), "stage": stage, "gate": gate,
              "status": event.get("status"), "run folder": event.get("run_dir")}
    for key in ("dag_id", "task_id", "try_number", "log_url"):
        fields[key.replace("_", " ")] = event.get(key)
    return slack_message(title, fields, str(error) if error else None)


def parse_events(names: Iterable[str]) -> frozenset[str]:
    """Validate an event selection (``all`` = every event); unknown names are errors."""
    chosen = {n.strip() for n in names if n.strip()}
    if "all" in chosen:
        return ALL_EVENTS
    unknown = chosen - ALL_EVENTS
    if unknown:
        raise ConfigError(f"unknown alert event(s) {sorted(unknown)}; known: {sorted(ALL_EVENTS)} or 'all' "
                          f"(check {EVENTS_ENV})")
    return frozenset(chosen)


# ------------------------------------------------------------------------------------ posting
def _retryable(exc: BaseException) -> bool:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def post_webhook(url: str, payload: Mapping[str, Any], *, timeout: float = DEFAULT_TIMEOUT_S,
                 attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = 0.5) -> int:
    """POST ``payload`` as JSON; retry connection errors, timeouts, 429 and 5xx with exponential backoff.

    Returns the HTTP status code; raises :class:`WebhookError` (naming the host, never the secret path)
    when every attempt failed or the receiver rejected the message (4xx).
    """
    import httpx
    from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError(f"alert webhook URL must start with http:// or https:// (got {url[:16]!r}...); "
                          f"set {WEBHOOK_ENV}")
    host = httpx.URL(url).host

    @retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(max(1, attempts)),
           wait=wait_exponential(multiplier=backoff_s, max=10 * backoff_s), reraise=True)
    def _post() -> int:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            response = client.post(url, json=dict(payload))
            response.raise_for_status()
            return response.status_code

    try:
        return _post()
    except httpx.HTTPStatusError as exc:
        raise WebhookError(f"alert webhook at {host} answered HTTP {exc.response.status_code} "
                           f"({exc.response.text[:200]!r}); check {WEBHOOK_ENV}") from None
    except httpx.HTTPError as exc:
        raise WebhookError(f"alert webhook at {host} unreachable after {attempts} attempt(s): "
                           f"{type(exc).__name__}: {exc}") from None


@dataclass
class WebhookAlerter:
    """Posts chain events to a Slack-compatible webhook. Use as ``ChainRunner(hooks=[WebhookAlerter()])``.

    Without a URL (argument or ``NITERU_ALERT_WEBHOOK``) it is disabled and only logs. Posting errors are
    logged, never raised: an alert outage must not fail the chain.
    """

    url: str | None = None
    events: Iterable[str] | None = None  # default: NITERU_ALERT_EVENTS (comma-separated, 'all') or stage_failed
    timeout: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS
    sent: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url or os.environ.get(WEBHOOK_ENV) or None
        if self.events is None:
            env = os.environ.get(EVENTS_ENV, "")
            self.events = parse_events(env.split(",")) if env.strip() else DEFAULT_EVENTS
        self.events = parse_events(self.events)

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def notify(self, message: Mapping[str, Any]) -> bool:
        """Post one message; ``True`` when delivered."""
        if not self.url:
            log.info("alert not sent (no webhook; set %s): %s", WEBHOOK_ENV, message.get("text", "")[:200])
            return False
        try:
            post_webhook(self.url, message, timeout=self.timeout, attempts=self.attempts)
        except (WebhookError, ConfigError) as exc:
            log.error("could not deliver alert: %s", exc)
            return False
        self.sent.append(dict(message))
        return True

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") in self.events:
            self.notify(format_event(event))


def webhook_hook_from_env() -> WebhookAlerter:
    """The ChainRunner hook configured from ``NITERU_ALERT_WEBHOOK`` / ``NITERU_ALERT_EVENTS`` (used by the CLI)."""
    return WebhookAlerter()


# ------------------------------------------------------------------------------------ Airflow
def airflow_failure_callback(context: Mapping[str, Any]) -> None:
    """``on_failure_callback`` for Airflow tasks: posts the failed task, its run folder and the (gate) error."""
    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    run_dir = None
    if ti is not None:
        try:
            run_dir = ti.xcom_pull(task_ids="init_run")
        except Exception:  # XCom may be unavailable in a failure callback; the alert still goes out
            run_dir = None
    event = {
        "event": "stage_failed",
        "run_id": Path(run_dir).name if run_dir else getattr(context.get("dag_run"), "run_id", None),
        "run_dir": run_dir,
        "stage": getattr(ti, "task_id", None),
        "status": runs.STATUS_FAILED,
        "error": f"{type(exc).__name__}: {exc}" if exc is not None else "task failed (no exception in context)",
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "try_number": getattr(ti, "try_number", None),
        "log_url": getattr(ti, "log_url", None),
    }
    WebhookAlerter(events={"stage_failed"})(event)


# ------------------------------------------------------------------------------------ SLA
@dataclass(frozen=True)
class SlaResult:
    ok: bool
    state: str  # met | pending | missed
    deadline: str
    window_start: str
    run_id: str | None
    run_status: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_time(value: str | dt.datetime | None) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"cannot parse time {value!r}: use ISO 8601, e.g. 2026-11-03T06:00:00+00:00") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def resolve_deadline(deadline: str | dt.time | dt.datetime, now: dt.datetime) -> dt.datetime:
    """An absolute deadline; ``HH:MM`` (UTC) or a ``datetime.time`` means that time on ``now``'s day."""
    if isinstance(deadline, dt.datetime):
        return parse_time(deadline)  # type: ignore[return-value]
    if isinstance(deadline, dt.time):
        tod = deadline
    else:
        text = str(deadline).strip()
        if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):
            tod = dt.time.fromisoformat(text if len(text.split(":")[0]) == 2 else "0" + text)
        else:
            return parse_time(text)  # type: ignore[return-value]
    tz = tod.tzinfo or dt.timezone.utc
    local_now = now.astimezone(tz)
    return dt.datetime.combine(local_now.date(), tod.replace(tzinfo=None), tzinfo=tz)


def check_sla(runs_root: str | os.PathLike[str], deadline: str | dt.time | dt.datetime,
              now: str | dt.datetime | None = None, *, window_h: float = 24.0,
              alerter: WebhookAlerter | None = None) -> SlaResult:
    """Did the latest run of the day succeed by ``deadline``?

    The day's runs are those started in the ``window_h`` hours before the deadline (for a daily DAG
    starting at 00:00 with a 06:00 deadline: yesterday-06:00 .. today-06:00). Before the deadline the result is
    ``pending`` unless the latest run already succeeded. At or after it, the SLA is ``missed`` when there is no
    run, when the latest run has not succeeded, or when it succeeded after the deadline; a miss posts an alert
    through ``alerter`` (default: a :class:`WebhookAlerter` from ``NITERU_ALERT_WEBHOOK``).
    """
    now_dt = parse_time(now) or runs.utcnow()
    due = resolve_deadline(deadline, now_dt)
    start = due - dt.timedelta(hours=window_h)
    in_window = [r for r in runs.list_runs(runs_root)
                 if r.started_at and start <= parse_time(r.started_at) < due]  # type: ignore[operator]
    latest = in_window[-1] if in_window else None  # list_runs is oldest first
    ended = parse_time(latest.ended_at) if latest and latest.ended_at else None
    succeeded_in_time = bool(latest and latest.status == runs.STATUS_SUCCEEDED and ended and ended <= due)
    if succeeded_in_time:
        state, msg = "met", f"run {latest.run_id} succeeded at {latest.ended_at} (deadline {due.isoformat()})"
    elif now_dt < due:
        state = "pending"
        msg = (f"deadline {due.isoformat()} not reached; latest run: "
               + (f"{latest.run_id} ({latest.status})" if latest else "none yet"))
    elif latest is None:
        state, msg = "missed", f"no run started in {Path(runs_root)} between {start.isoformat()} and {due.isoformat()}"
    elif latest.status == runs.STATUS_SUCCEEDED:
        state, msg = "missed", f"run {latest.run_id} succeeded late, at {latest.ended_at} (deadline {due.isoformat()})"
    else:
        state, msg = "missed", f"latest run {latest.run_id} is '{latest.status}' at the deadline {due.isoformat()}"
    result = SlaResult(ok=state != "missed", state=state, deadline=due.isoformat(), window_start=start.isoformat(),
                       run_id=latest.run_id if latest else None, run_status=latest.status if latest else None,
                       message=msg)
    if state == "missed":
        log.error("SLA missed: %s", msg)
        fields = {"runs root": str(runs_root), "deadline": due.isoformat(), "latest run": result.run_id,
                  "status": result.run_status}
        (alerter or WebhookAlerter()).notify(slack_message(":alarm_clock: niteru daily SLA missed", fields, msg))
    else:
        log.info("SLA %s: %s", state, msg)
    return result


# ------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m niteru.alerts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sla = sub.add_parser("sla", help="check that the latest run of the day succeeded by a deadline (exit 1 if not)")
    sla.add_argument("--runs-root", default=os.environ.get("NITERU_RUNS_ROOT", "runs"))
    sla.add_argument("--deadline", required=True, help="HH:MM (UTC, today) or an ISO 8601 datetime")
    sla.add_argument("--now", default=None, help="ISO 8601 'now' (default: the current time)")
    sla.add_argument("--window-h", type=float, default=24.0, help="hours before the deadline that count as the day")
    test = sub.add_parser("test", help="post a test message to the webhook")
    test.add_argument("--text", default="niteru alert test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "sla":
        result = check_sla(args.runs_root, args.deadline, args.now, window_h=args.window_h)
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0 if result.ok else 1
    alerter = WebhookAlerter()
    if not alerter.enabled:
        raise SystemExit(f"no webhook configured: set {WEBHOOK_ENV}")
    return 0 if alerter.notify(slack_message(args.text, {})) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
