"""Airflow DAG file for the niteru chain (copy or point Airflow's dags_folder here; niteru must be installed).

Configured from the environment (see niteru.airflow_dag.DagSettings.from_env and docs/airflow.md):
NITERU_RUNS_ROOT (required), NITERU_CHAIN_CONFIG, NITERU_SHARDS, NITERU_DAG_SCHEDULE, NITERU_OUTPUT_URL,
NITERU_GPU_BACKEND + NITERU_K8S_*, NITERU_ALERT_WEBHOOK (alerts), NITERU_SLA_DEADLINE (adds the niteru_sla DAG).
"""

from __future__ import annotations

import os

from niteru.airflow_dag import DagSettings, build_dag, build_sla_dag

settings = DagSettings.from_env()
niteru_chain = build_dag(settings)

if os.environ.get("NITERU_SLA_DEADLINE"):
    niteru_sla = build_sla_dag(settings.runs_root, os.environ["NITERU_SLA_DEADLINE"],
                               window_h=float(os.environ.get("NITERU_SLA_WINDOW_H", "24")))
