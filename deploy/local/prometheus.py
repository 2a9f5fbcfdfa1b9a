"""A real Prometheus server (Debian's `prometheus` package) for the embedded stack: loopback only,
its own data directory, scraping every process of the stack with the mesh's rules loaded.

Job names are the process names (`gateway`, `triton`, `etcd`, …), the same as the Kubernetes
scrape configuration gives them, so alerts such as `up{job="etcd"} == 0` mean one thing everywhere.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

from services.common.net import LOOPBACK, free_port
from services.common.processes import ChildProcess

RULES_DIR = pathlib.Path(__file__).resolve().parents[1] / "monitoring" / "rules"
SCRAPE_INTERVAL_S = 5
EVALUATION_INTERVAL_S = 15
RETENTION = "7d"


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed: `make install` installs Debian's "
                                "prometheus package")
    return binary


def scrape_config(targets: Mapping[str, str], rule_files: list[pathlib.Path]) -> dict:
    """One static job per kind of process (`targets`: process → host:port of its /metrics);
    a second instance (`scheduler-2`) is one more target of its kind's job."""
    jobs: dict[str, list[str]] = {}
    for name, endpoint in sorted(targets.items()):
        jobs.setdefault(re.sub(r"-\d+$", "", name), []).append(endpoint)
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S - 1}s",
            "evaluation_interval": f"{EVALUATION_INTERVAL_S}s",
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": endpoints}]}
            for job, endpoints in sorted(jobs.items())
        ],
    }


class PrometheusServer:
    """Prometheus on a free loopback port; `endpoint` is its host:port (API and UI)."""

    def __init__(self, state_dir: pathlib.Path, log_path: pathlib.Path,
                 targets: Mapping[str, str]):
        self.port = free_port()
        self.data_dir = state_dir / "data" / "prometheus"
        self.config_path = state_dir / "prometheus.yml"
        self.targets = {**targets, "prometheus": self.endpoint}
        self.process = ChildProcess(
            "prometheus",
            [
                prometheus_binary(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={RETENTION}",
                f"--web.listen-address={self.endpoint}",
                "--log.level=warn",
            ],
            log_path,
        )

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        """Writes the configuration (JSON is YAML) and returns once the server is ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rule_files = sorted(RULES_DIR.glob("*.yml"))
        self.config_path.write_text(json.dumps(scrape_config(self.targets, rule_files), indent=2))
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"prometheus exited:\n{self.process.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.process.stop(grace_s=5.0)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self.process.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False
