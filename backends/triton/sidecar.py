"""The sidecar beside each Triton server: registers the replica, reports its load, applies the
scheduler's placements and drains on SIGTERM.

Three loops share one etcd lease (short TTL, so a replica whose sidecar dies disappears within
seconds): health (Triton ready, models READY with their versions) every `health_interval_s`,
rewriting `replicas/<id>` when it changes; load (Triton's metrics page) every `load_interval_s`,
rewriting `load/<id>` when it changes and at least every `load_refresh_s` (the scheduler treats an
older report as a dead replica); placement, following `placements/<id>` and loading or unloading
models through Triton's model control API. A fourth asks each model's engine process whether it
is alive (models that declare the probe input): a crashed Python-backend stub leaves Triton
calling the model READY while failing every request, so the sidecar restarts (unloads and loads)
that model. The decisions and the values live in
`replica_status.py`; this module only does the I/O, each call under a deadline.

A placement names, for each model it places, the registered version it serves. Before loading
such a model the sidecar fetches the version from the registry (its manifest, checked against
the version id, and every file it pins, into the replica's blob cache: verified, resumable,
bounded in bytes), renders its Triton model into `model_repository`, and only then asks Triton to
load it; the record lists the version ids served. Nothing is shared with the registry but its
API.

On SIGTERM the record is republished with `draining: true` (no new work is routed here), the
sidecar waits until the engines report no request running or waiting (or `drain_timeout_s`
passes), and only then revokes the lease, so both keys disappear at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field, model_validator

from backends.triton.adapter import PROBE_INPUT, engine_process_gone, probe_engine, triton_client
from backends.triton.calibration import EngineProfile
from backends.triton.control import control_headers, read_token
from backends.triton.kv_feed import KvEventsServicer, KvMirrors
from backends.triton.replica_status import (
    ModelLoad,
    ReplicaIdentity,
    is_idle,
    load_report,
    parse_engine_metrics,
    plan_placement,
    probe_verdict,
    replica_record,
    restarts_within_budget,
)
from backends.triton.repository import render_version
from backends.triton.weights import cache_root
from infermesh.v1 import kv_events_pb2
from services.common import errors, etcd
from services.common.discovery import ServiceDirectory
from services.common.frames import add_servicer
from services.common.logs import get_logger
from services.common.records import PlacementRecord
from services.common.runtime import ServiceContext, ServiceParts, main
from services.common.settings import BlobCacheSettings, ServiceSettings
from services.registry.blob_cache import BlobCache
from services.registry.client import RegistryClient, mesh_download
from services.registry.manifest import served_model_name, version_id

log = get_logger(__name__)
READY = Gauge("infermesh_sidecar_triton_ready", "1 when Triton answers ready.", ["replica"])
MODELS = Gauge("infermesh_sidecar_models_ready", "Models loaded, ready and served.", ["replica"])
DRAINING = Gauge("infermesh_sidecar_draining", "1 while the replica drains.", ["replica"])
LOAD_REPORTS = Counter("infermesh_sidecar_load_reports_total", "Load reports written to etcd.",
                       ["replica"])
SCRAPE_FAILURES = Counter("infermesh_sidecar_scrape_failures_total",
                          "Triton metrics scrapes that failed (no load report written).",
                          ["replica"])
PLACEMENT_ACTIONS = Counter("infermesh_sidecar_placement_actions_total",
                            "Model loads, unloads and restarts, by outcome.", ["action", "outcome"])
ENGINE_RESTARTS = Counter("infermesh_sidecar_engine_restarts_total",
                          "Models restarted because their engine process was found dead.",
                          ["model"])
PLACEMENT_SECONDS = Histogram("infermesh_sidecar_placement_action_seconds",
                              "How long a model load or unload took.", ["action"],
                              buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
COLD_STARTS = Histogram("infermesh_sidecar_version_cold_start_seconds",
                        "From a placed version's load starting to its model READY: manifest and "
                        "files fetched from the registry (or found in the blob cache), verified, "
                        "rendered, loaded.", buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))


class SidecarSettings(ServiceSettings, BlobCacheSettings):
    model_repository: pathlib.Path | None = Field(
        None, description="Triton's model repository (shared with the Triton beside this "
        "sidecar): each registered version placed here is rendered into it. Unset: placed "
        "models are only loaded, as the repository already has them.")
    triton_grpc_endpoint: str = Field("127.0.0.1:8001", description="Triton's gRPC host:port.")
    triton_control_token_file: pathlib.Path | None = Field(
        None, description="This replica's model-control token (backends/triton/control.py), "
        "sent on every control call; unset: Triton's control is not restricted (plaintext "
        "development).")
    triton_metrics_endpoint: str = Field(
        "127.0.0.1:8002", description="Triton's metrics host:port."
    )
    kv_events_dir: pathlib.Path | None = Field(
        None, description="Where Triton's models serve their KV events (Unix sockets, "
        "backends/triton/kv_event_socket.py; the same INFERMESH_KV_EVENTS_DIR Triton has). "
        "Unset: no events are streamed, and schedulers route this replica approximately.")
    replica_id: str = Field("replica-0", min_length=1, description="Unique name of this replica.")
    zone: str = Field("local", description="Failure domain, for zone-aware routing ('' unknown).")
    gpu_type: str = Field("cpu", min_length=1,
                          description='Accelerator model, e.g. "H100-80GB"; "cpu" without one.')
    gpu_memory_mib: int = Field(8192, gt=0, description="Accelerator memory placement may fill.")
    health_interval_s: float = Field(
        0.5, gt=0, le=5, description="How often Triton's health and models are checked."
    )
    load_interval_s: float = Field(0.25, gt=0, le=5, description="How often load is scraped.")
    load_refresh_s: float = Field(
        1.0, gt=0, le=1.0, description="Longest time between two load reports, changed or not. "
        "Schedulers drop a replica whose report is older than their INFERMESH_LOAD_STALE_AFTER_S "
        "(1.5 s): this plus load_interval_s must stay under it, or idle replicas blink out."
    )
    replica_lease_ttl_s: int = Field(
        2, ge=2, description="TTL of the lease under the replica's keys (etcd's minimum is ~2)."
    )
    triton_timeout_s: float = Field(1.0, gt=0, description="Deadline for a health check or scrape.")
    engine_probe_interval_s: float = Field(
        2.0, ge=0, le=60, description="How often each model's engine process is asked whether it "
        "is alive (models whose config declares the `infermesh_probe` input); 0 never asks."
    )
    engine_probe_timeout_s: float = Field(
        2.0, gt=0, le=30, description="How long a liveness probe may go unanswered before it "
        "counts as a miss."
    )
    engine_probe_misses: int = Field(
        3, ge=1, le=20, description="Probes in a row left unanswered after which the model is "
        "restarted; an answer that the engine is gone restarts it at once."
    )
    engine_max_restarts: int = Field(
        3, ge=1, le=100, description="Engine restarts of one model allowed per "
        "engine_restart_window_s; past them the model is left unloaded and reported as a "
        "placement error (the scheduler places it elsewhere)."
    )
    engine_restart_window_s: float = Field(600.0, gt=0, description="See engine_max_restarts.")
    model_control_timeout_s: float = Field(
        300.0, gt=0, description="Deadline for one model load or unload (engines load slowly; "
        "an unload waits for the model's in-flight requests)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="Longest SIGTERM waits for in-flight generations before leaving."
    )
    engine_profiles: list[pathlib.Path] = Field(
        default_factory=list,
        description="Profiles from `meshctl engine calibrate` (JSON list of paths): the record "
        "publishes each profiled model's capacity in tokens/s; unprofiled models have none.",
    )

    @model_validator(mode="after")
    def _refresh_after_interval(self) -> SidecarSettings:
        if self.load_refresh_s < self.load_interval_s:
            raise ValueError(
                f"load_refresh_s ({self.load_refresh_s}) must be >= load_interval_s "
                f"({self.load_interval_s})"
            )
        return self


def engine_capacity(paths: list[pathlib.Path]) -> dict[str, tuple[float, float]]:
    """Triton model → (prefill, decode tokens/s) from calibrated profiles; an unreadable or
    invalid profile stops the sidecar at start with the file's name."""
    capacity: dict[str, tuple[float, float]] = {}
    for path in paths:
        try:
            profile = EngineProfile.from_json(path.read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"engine_profiles: {path}: {exc}") from exc
        rates = profile.token_rates()
        if rates is None:
            log.warning("engine_profile_without_capacity", path=str(path))
        else:
            capacity[profile.triton_model_name] = rates
    return capacity


def _fetch_text(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


class Sidecar:
    """One replica's sidecar. `run()` returns once the lease is revoked after a drain."""

    def __init__(self, ctx: ServiceContext, settings: SidecarSettings,
                 directory: ServiceDirectory, blobs: BlobCache, control_token: str | None,
                 kv_mirrors: KvMirrors):
        """`directory` finds the registry (its channels carry the mesh token); `blobs` is this
        replica's cache of the files the versions it serves pin; `control_token` is what
        Triton asks of model control calls (None: an unrestricted Triton)."""
        self._ctx = ctx
        self._settings = settings
        self._identity = ReplicaIdentity(
            replica_id=settings.replica_id,
            grpc_endpoint=settings.triton_grpc_endpoint,
            metrics_endpoint=settings.triton_metrics_endpoint,
            zone=settings.zone,
            gpu_type=settings.gpu_type,
            gpu_memory_mib=settings.gpu_memory_mib,
            sidecar_endpoint=ctx.endpoint if settings.kv_events_dir is not None else "",
        )
        self._kv_mirrors = kv_mirrors  # followed for the models READY
        self._capacity = engine_capacity(settings.engine_profiles)
        self._triton = triton_client(settings.triton_grpc_endpoint, ctx.tls)
        self._control = control_headers(control_token)
        self._lease = etcd.LeaseKeeper(ctx.etcd, settings.replica_lease_ttl_s)
        self._placements: etcd.WatchCache[PlacementRecord] = etcd.WatchCache(
            ctx.etcd, etcd.Keys.placement(settings.replica_id),
            lambda _suffix, raw: PlacementRecord.decode(etcd.decode(raw)),
            on_change=self._placement_changed,
        )
        self._directory = directory
        self._blobs = blobs
        self._version_ids: dict[str, str] = {}  # model → the registered version it serves
        self._adopt_tried: set[str] = set()  # served models found loaded, adopted once a target
        # What Triton and its engines said last.
        self._ready = False
        self._probed = asyncio.Event()  # set after the first successful model listing
        self._versions: dict[str, str] = {}  # READY models → Triton version
        self._loads: dict[str, ModelLoad] = {}
        self._scraped = asyncio.Condition()  # notified after every scrape, ok or not
        self._scrape_ok = False
        # Placement state.
        self._target: PlacementRecord | None = None
        self._actions: dict[str, asyncio.Task[None]] = {}  # model → its load or unload under way
        self._unloading: set[str] = set()  # already left out of `models`: no new routes
        self._actions_done = 0  # placement actions finished (each ends with its own probe)
        self._failed: set[str] = set()  # failed for the current target: not retried
        self._errors: dict[str, str] = {}
        self._reconcile = asyncio.Event()
        self._draining = False
        self._probe_inputs: dict[tuple[str, str], bool] = {}  # (model, version) → declares it
        self._probe_misses: dict[str, int] = {}  # model → probes in a row without an answer
        self._restarts: dict[str, list[float]] = {}  # model → its recent engine restarts
        # What etcd holds.
        self._record_lock = asyncio.Lock()
        self._published_record: dict[str, Any] | None = None
        self._published_load: dict[str, Any] | None = None
        self._load_written_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Registers, then serves until the runtime starts draining; then drains and withdraws."""
        settings = self._settings
        loops: list[asyncio.Task[None]] = []
        try:
            if not await self._start_lease():
                return
            await self._directory.start()
            loops = [
                asyncio.create_task(self._every(settings.health_interval_s, self._check_health),
                                    name="sidecar health"),
                asyncio.create_task(self._every(settings.load_interval_s, self._report_load),
                                    name="sidecar load"),
                asyncio.create_task(self._apply_placements(), name="sidecar placements"),
            ]
            if settings.engine_probe_interval_s:
                loops.append(asyncio.create_task(
                    self._every(settings.engine_probe_interval_s, self._probe_engines),
                    name="sidecar engine probe"))
            await self._ctx.draining.wait()
            await self._drain()
        finally:
            tasks = [*loops, *self._actions.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._placements.stop()
            await self._kv_mirrors.close()
            await self._directory.close()
            await self._lease.close()  # revokes: the record and the load report vanish together
            await self._triton.close()
            DRAINING.labels(settings.replica_id).set(0)
            log.info("replica_withdrawn", replica=settings.replica_id)

    async def _start_lease(self) -> bool:
        """Grants the lease, retrying while etcd is away; False if draining began first."""
        while not self._ctx.draining.is_set():
            try:
                await self._lease.start()
                return True
            except Exception as exc:
                log.warning("replica_lease_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.health_interval_s):
                    await self._ctx.draining.wait()
        return False

    async def _every(self, interval_s: float, tick: Callable[[], Awaitable[None]]) -> None:
        while True:
            started = time.monotonic()
            try:
                await tick()
            except Exception as exc:  # one bad tick (etcd away): keep going, the next may pass
                log.warning("sidecar_tick_failed", tick=tick.__name__, error=repr(exc))
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def _drain(self) -> None:
        """draining: true first (routing stops), then wait for the engines to go idle."""
        settings = self._settings
        self._draining = True
        self._reconcile.set()  # the placement loop sees _draining and stops applying
        DRAINING.labels(settings.replica_id).set(1)
        deadline = time.monotonic() + settings.drain_timeout_s
        log.info("replica_draining", timeout_s=settings.drain_timeout_s)
        while not await self._publish_record():  # etcd away: keep trying within the deadline
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(settings.health_interval_s, deadline - time.monotonic()))
        # Two idle scrapes in a row: a request routed just before `draining` was seen gets the
        # time of one scrape interval to show up in the engine's counts.
        idle_in_a_row = 0
        while idle_in_a_row < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain_timed_out", timeout_s=settings.drain_timeout_s,
                            loads={m: load.report() for m, load in self._loads.items()})
                return
            try:
                async with asyncio.timeout(left):
                    async with self._scraped:
                        await self._scraped.wait()
            except TimeoutError:
                continue
            if not self._scrape_ok:
                log.info("drain_ended_triton_gone")  # nothing left there to wait for
                return
            idle_in_a_row = idle_in_a_row + 1 if is_idle(self._loads) else 0
        log.info("replica_drained")

    # -- health and the record -----------------------------------------------------------------

    async def _check_health(self) -> None:
        actions_done = self._actions_done
        ready, versions = await self._probe()
        if actions_done != self._actions_done:
            return  # a load or unload finished while we probed: its own probe is newer
        if ready and not self._ready:  # (re)started: what failed on the old server gets a retry
            self._failed.clear()
        self._ready = ready
        if versions is not None:
            self._versions = versions
            self._kv_mirrors.follow(versions)
            self._probed.set()
            self._reconcile.set()
        READY.labels(self._settings.replica_id).set(int(ready))
        await self._publish_record()

    async def _probe(self) -> tuple[bool, dict[str, str] | None]:
        """(ready, READY models → version); (False, None) when Triton does not answer in time."""
        timeout_s = self._settings.triton_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                ready = await self._triton.is_server_ready(client_timeout=timeout_s)
                index = await self._triton.get_model_repository_index(
                    headers=self._control, as_json=True, client_timeout=timeout_s
                )
        except Exception as exc:  # unreachable, or an error status: not ready either way
            if self._ready:
                log.warning("triton_probe_failed", error=repr(exc))
            return False, None
        versions: dict[str, str] = {}
        for model in index.get("models", []):
            if model.get("state") == "READY":
                version = str(model.get("version", ""))
                versions[model["name"]] = max(versions.get(model["name"], ""), version, key=_order)
        return bool(ready), versions

    async def _publish_record(self) -> bool:
        """Writes `replicas/<id>` if it changed; False when etcd refused (retried next tick)."""
        async with self._record_lock:
            served = {m: v for m, v in self._versions.items() if m not in self._unloading}
            record = replica_record(self._identity, self._ready, served, self._loads,
                                    self._draining, self._errors, self._capacity,
                                    self._version_ids)
            MODELS.labels(self._settings.replica_id).set(len(record["models"]))
            if record == self._published_record:
                return True
            try:
                await self._lease.put(etcd.Keys.replica(self._settings.replica_id), record)
            except Exception as exc:
                log.warning("replica_publish_failed", error=repr(exc))
                return False
            self._published_record = record
            log.info("replica_published", healthy=record["healthy"], models=record["models"],
                     draining=record["draining"], placement_errors=record["placement_errors"])
            return True

    # -- load ----------------------------------------------------------------------------------

    async def _report_load(self) -> None:
        loads = await self._scrape()
        async with self._scraped:
            self._scrape_ok = loads is not None
            if loads is not None:
                kv_changed = _kv(loads) != _kv(self._loads)
                self._loads = loads
            self._scraped.notify_all()
        if loads is None:
            SCRAPE_FAILURES.labels(self._settings.replica_id).inc()
            return  # no report: a stale one tells the scheduler this replica is gone
        if not self._probed.is_set():
            return  # which models it serves is not known yet
        if kv_changed:
            await self._publish_record()
        served = [m for m in self._versions if m not in self._unloading]
        now = time.time()
        report = load_report(self._settings.replica_id, now, loads, served)
        unchanged = self._published_load is not None and {**report, "at": 0} == {
            **self._published_load, "at": 0}
        if unchanged and now - self._load_written_at < self._settings.load_refresh_s:
            return
        await self._lease.put(etcd.Keys.load(self._settings.replica_id), report)
        self._published_load, self._load_written_at = report, now
        LOAD_REPORTS.labels(self._settings.replica_id).inc()

    async def _scrape(self) -> dict[str, ModelLoad] | None:
        timeout_s = self._settings.triton_timeout_s
        url = f"http://{self._settings.triton_metrics_endpoint}/metrics"
        try:
            async with asyncio.timeout(timeout_s):
                text = await asyncio.to_thread(_fetch_text, url, timeout_s)
            return parse_engine_metrics(text)
        except Exception as exc:  # refused, timed out, or not a metrics page
            log.debug("triton_scrape_failed", error=repr(exc))
            return None

    # -- engine processes ----------------------------------------------------------------------

    async def _probe_engines(self) -> None:
        """Restarts every served model whose engine answers that it is gone, or that leaves
        `engine_probe_misses` probes in a row unanswered (a request sent as the process died
        hangs its model instance, and everything queued behind it)."""
        settings = self._settings
        for model, version in list(self._versions.items()):
            if not self._probe_wanted(model, version):
                continue
            if not await self._declares_probe(model, version):
                continue
            ENGINE_RESTARTS.labels(model)  # exported at 0 from the start: alerts can use it
            try:
                failure = await probe_engine(self._triton, model, settings.engine_probe_timeout_s)
                answered = True
            except TimeoutError:
                failure, answered = None, False
            except Exception as exc:  # unreachable: the health loop judges Triton itself
                log.warning("engine_probe_failed", model=model, error=repr(exc))
                continue
            gone = failure is not None and engine_process_gone(failure)
            restart, misses = probe_verdict(gone, answered, self._probe_misses.get(model, 0),
                                            settings.engine_probe_misses)
            self._probe_misses[model] = misses
            if not answered and not restart:
                log.warning("engine_probe_unanswered", model=model, misses=misses)
            # The probe took time: act only if nothing else took the model over meanwhile.
            if not restart or not self._probe_wanted(model, version):
                continue
            ENGINE_RESTARTS.labels(model).inc()
            log.error("engine_gone_restarting", model=model, error=failure or "no answer")
            self._unloading.add(model)  # out of routing while it restarts
            self._start_action(model, "restart", self._restart)
            await self._publish_record()

    def _probe_wanted(self, model: str, version: str) -> bool:
        """Served, ready and left alone: no load, unload or restart under way, no drain."""
        return (self._ready and not self._draining and self._versions.get(model) == version
                and model not in self._actions and model not in self._unloading)

    async def _declares_probe(self, model: str, version: str) -> bool:
        known = self._probe_inputs.get((model, version))
        if known is None:
            timeout_s = self._settings.triton_timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    config = await self._triton.get_model_config(
                        model, version, headers=self._control, as_json=True,
                        client_timeout=timeout_s)
            except Exception as exc:  # asked again on the next round
                log.debug("model_config_unreadable", model=model, error=repr(exc))
                return False
            inputs = config.get("config", {}).get("input", [])
            known = any(i.get("name") == PROBE_INPUT for i in inputs)
            self._probe_inputs[model, version] = known
        return known

    async def _restart(self, model: str) -> None:
        """Unload (a dead process holds nothing to wait for) and load: a new engine process —
        unless it already died `engine_max_restarts` times in the window: then it stays
        unloaded and the failure is reported."""
        settings = self._settings
        allowed, self._restarts[model] = restarts_within_budget(
            self._restarts.get(model, ()), time.monotonic(), settings.engine_restart_window_s,
            settings.engine_max_restarts)
        await self._unload(model, forget=not allowed)  # a restart keeps its files and render
        if not allowed:
            raise RuntimeError(
                f"its engine died {settings.engine_max_restarts} times within "
                f"{settings.engine_restart_window_s:g}s: left unloaded")
        await self._load(model)

    # -- placement -----------------------------------------------------------------------------

    def _placement_changed(self) -> None:
        self._reconcile.set()

    async def _apply_placements(self) -> None:
        """Follows `placements/<id>`; every change, finished action or health check re-plans."""
        try:
            await self._placements.start(timeout_s=self._settings.etcd_timeout_s * 2)
        except TimeoutError:  # etcd away: the cache keeps retrying; its first load re-plans
            log.warning("placement_watch_not_loaded")
        await self._probed.wait()
        while not self._draining:
            await self._reconcile.wait()
            self._reconcile.clear()
            if not self._draining:
                await self._plan_and_act()

    async def _plan_and_act(self) -> None:
        target = self._placements.get("")
        if target is None:  # no placement for this replica: keep whatever it has
            if self._target is not None:  # withdrawn: its errors are no longer news
                self._target, self._errors = None, {}
                self._failed.clear()
                await self._publish_record()
            return
        if target != self._target:
            self._target = target
            self._failed.clear()  # a new target retries what failed before
            self._adopt_tried.clear()
            self._errors = {m: e for m, e in self._errors.items() if m in target.models}
            log.info("placement_received", models=sorted(target.models),
                     generation=target.generation)
        for model in target.versions:  # served already, not by us: a restarted sidecar
            if model in self._versions and model not in self._actions \
                    and model not in self._version_ids and model not in self._adopt_tried:
                self._adopt_tried.add(model)
                self._start_action(model, "adopt", self._adopt)
        plan = plan_placement(target, self._versions, self._actions, self._failed,
                              self._unloading)
        if plan.unload:
            self._unloading |= plan.unload
            await self._publish_record()  # out of routing before Triton is asked to unload
        for model in plan.load:
            self._start_action(model, "load", self._load)
        for model in plan.unload:
            self._start_action(model, "unload", self._unload)

    def _start_action(self, model: str, action: str,
                      run: Callable[[str], Awaitable[None]]) -> None:
        async def act() -> None:
            started = time.monotonic()
            try:
                await run(model)
            except Exception as exc:
                message = f"{action} failed: {_describe(exc)}"
                self._failed.add(model)
                self._errors[model] = message
                PLACEMENT_ACTIONS.labels(action, "error").inc()
                log.warning("placement_action_failed", model=model, action=action, error=message)
            else:
                self._errors.pop(model, None)
                PLACEMENT_ACTIONS.labels(action, "ok").inc()
                log.info("placement_action_done", model=model, action=action,
                         seconds=round(time.monotonic() - started, 3))
            finally:
                PLACEMENT_SECONDS.labels(action).observe(time.monotonic() - started)
                ready, versions = await self._probe()  # the next plan must see the outcome
                if versions is not None:
                    self._ready, self._versions = ready, versions
                self._actions_done += 1  # a health probe begun before this one is now stale
                self._unloading.discard(model)
                del self._actions[model]
                self._reconcile.set()
                with contextlib.suppress(Exception):  # the health loop retries a failed write
                    await self._publish_record()

        log.info("placement_action_started", model=model, action=action)
        self._actions[model] = asyncio.create_task(act(), name=f"{action} {model}")

    async def _load(self, model: str) -> None:
        """Loads `model`. A registered version not prepared yet is fetched, verified and
        rendered first; if it then fails to load, its pins and render go (nothing leaks)."""
        ref = self._target.versions.get(model) if self._target is not None else None
        fresh = ref is not None and model not in self._version_ids
        started = time.monotonic()
        timeout_s = self._settings.model_control_timeout_s
        try:
            if fresh:
                await self._prepare_version(model, ref)
            async with asyncio.timeout(timeout_s):
                await self._triton.load_model(model, headers=self._control,
                                              client_timeout=timeout_s)
        except BaseException:
            if fresh:
                await self._discard(model)
            raise
        if fresh:
            self._version_ids[model] = ref.partition("@")[2]
            COLD_STARTS.observe(time.monotonic() - started)

    async def _adopt(self, model: str) -> None:
        """A version Triton already serves (this sidecar restarted): its files verified and
        pinned again, its render current, so an engine restart or a cache eviction later finds
        them."""
        ref = self._target.versions.get(model) if self._target is not None else None
        if ref is None:
            return
        try:
            await self._prepare_version(model, ref)
        except Exception as exc:  # it still serves: no placement error; retried on a new target
            log.warning("version_adopt_failed", model=model, error=_describe(exc))
            return
        self._version_ids[model] = ref.partition("@")[2]

    async def _prepare_version(self, model: str, ref: str) -> None:
        """The version's manifest from the registry, proven to be the version placed (its
        digest is the version id); its files in the blob cache, verified and pinned while it is
        loaded; its Triton model rendered from the manifest."""
        repository = self._settings.model_repository
        if repository is None:
            raise errors.FailedPrecondition(
                f"placed version {ref} cannot be rendered: INFERMESH_MODEL_REPOSITORY is not set")
        timeout_s = self._settings.model_control_timeout_s
        async with asyncio.timeout(timeout_s):
            info = await RegistryClient.over(self._directory.channel("registry")).version(ref)
        manifest = json_format.MessageToDict(info.manifest, preserving_proto_field_name=True)
        wanted = ref.partition("@")[2]
        if info.version_id != wanted or version_id(manifest) != wanted \
                or served_model_name(manifest["name"], wanted) != model:
            raise errors.Internal(f"the registry's manifest for {ref} does not hash to it")
        files = [*manifest.get("weights", []), *manifest.get("tokenizer_files", [])]
        await self._blobs.ensure(files, pin=model)
        await asyncio.to_thread(render_version, repository, model, manifest,
                                self._blobs.store.root, cache_root())

    async def _unload(self, model: str, forget: bool = True) -> None:
        """Unloads `model` (Triton lets its in-flight requests finish first); `forget` also
        lets its blobs go and removes its render, even if the unload timed out (an engine that
        is still there keeps its weights in memory)."""
        timeout_s = self._settings.model_control_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._triton.unload_model(model, headers=self._control,
                                                client_timeout=timeout_s)
        finally:
            if forget and self._version_ids.pop(model, None) is not None:
                await self._discard(model)

    async def _discard(self, model: str) -> None:
        """A registered version's local state goes: its blobs may now be evicted (least
        recently used first), and its render leaves the repository (a restarted Triton will not
        load it)."""
        self._blobs.unpin(model)
        if self._settings.model_repository is not None:
            await asyncio.to_thread(shutil.rmtree, self._settings.model_repository / model, True)


def _order(version: str) -> tuple[int, str]:
    """Triton versions are integers; the highest READY one is the one reported."""
    return (int(version), version) if version.isdigit() else (-1, version)


def _kv(loads: dict[str, ModelLoad]) -> dict[str, dict[str, int] | None]:
    return {model: load.kv_capacity() for model, load in loads.items()}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or repr(exc)


async def setup(ctx: ServiceContext) -> ServiceParts:
    settings = ctx.settings
    assert isinstance(settings, SidecarSettings)
    directory = ServiceDirectory(ctx.etcd, ctx.tls, settings.mesh_token.get_secret_value())
    blobs = await asyncio.to_thread(
        BlobCache, settings.blob_cache_dir, settings.blob_cache_max_bytes,
        mesh_download(directory, settings.peer_timeout_s), settings.model_control_timeout_s)
    token_file = settings.triton_control_token_file
    control_token = None if token_file is None else await asyncio.to_thread(read_token, token_file)
    mirrors = KvMirrors(settings.kv_events_dir)
    kv_events = kv_events_pb2.DESCRIPTOR.services_by_name["KvEventsService"]
    add_servicer(ctx.server, KvEventsServicer(mirrors), kv_events, refuse_malformed=True)
    task = asyncio.create_task(
        Sidecar(ctx, settings, directory, blobs, control_token, mirrors).run(), name="sidecar")

    async def cleanup() -> None:
        # The runtime calls this after setting `draining`: the drain happens inside `task`.
        limit_s = settings.drain_timeout_s + settings.etcd_timeout_s * 3 + 5
        try:
            async with asyncio.timeout(limit_s):
                await task
        except TimeoutError:
            log.error("sidecar_stop_timed_out", limit_s=limit_s)

    return ServiceParts([kv_events.full_name], cleanup=cleanup)


if __name__ == "__main__":
    main("sidecar", SidecarSettings(), setup)
