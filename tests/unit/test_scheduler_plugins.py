"""Each routing filter and scorer on its own, built directly with test candidates (as llm-d's
plugin tests do)."""

import pytest

from services.scheduler import filters, scorers
from services.scheduler.breakers import Breakers, BreakerSettings
from services.scheduler.candidates import Candidate, RoutingContext
from services.scheduler.inventory import LoadReport
from services.scheduler.kv_index import KvIndex
from services.scheduler.outcome import Outcome
from services.scheduler.prefix_index import PrefixIndex
from tests.unit.scheduler_builders import query, replica, report


def candidate(rid, *, load_at=None, pending=0, **replica_args):
    rep = report(rid, load_at) if load_at is not None else None
    c = Candidate(replica(rid, **replica_args), rep, rep.models["m"] if rep else None)
    c.pending = pending
    return c


def context(q=None, *, now=10.0, loads=None, breakers=None, prefix=None):
    return RoutingContext(query=q or query(), now=now, loads=loads or {},
                          breakers=breakers or Breakers(BreakerSettings()),
                          prefix=prefix or PrefixIndex(), kv=KvIndex(), load_stale_after_s=1.5,
                          queue_scale=8)


def ids(candidates):
    return [c.replica_id for c in candidates]


def test_serves_model_healthy_not_draining_not_excluded():
    cs = [candidate("a"), candidate("b", models=("x",)), candidate("c", healthy=False),
          candidate("d", draining=True), candidate("e")]
    ctx = context(query(exclude=["e"]))
    assert ids(filters.ServesModel().filter(ctx, cs)) == ["a", "c", "d", "e"]
    assert ids(filters.Healthy().filter(ctx, cs)) == ["a", "b", "d", "e"]
    assert ids(filters.NotDraining().filter(ctx, cs)) == ["a", "b", "c", "e"]
    assert ids(filters.NotExcluded().filter(ctx, cs)) == ["a", "b", "c", "d"]


def test_fresh_load_keeps_recent_and_unreported_replicas():
    cs = [candidate("fresh", load_at=9.0), candidate("stale", load_at=8.4), candidate("new")]
    loads = {c.replica_id: c.report for c in cs if c.report}
    assert ids(filters.FreshLoad().filter(context(loads=loads), cs)) == ["fresh", "new"]


def test_fresh_load_falls_back_when_the_whole_feed_is_stale():
    cs = [candidate("a", load_at=1.0), candidate("b", load_at=2.0)]
    ctx = context(loads={c.replica_id: c.report for c in cs})
    assert ids(filters.FreshLoad().filter(ctx, cs)) == ["a", "b"]
    assert ctx.notes
    # But one fresh report elsewhere proves the feed works: these two are really silent.
    ctx = context(loads={**{c.replica_id: c.report for c in cs}, "z": report("z", 9.9)})
    assert filters.FreshLoad().filter(ctx, cs) == []


def test_breaker_filter_skips_open_replicas_and_zones():
    breakers = Breakers(BreakerSettings(consecutive_failures=1))
    breakers.record("a", "", Outcome.FAILED_BEFORE_FIRST_TOKEN, breakers.routed("a", "", 10), 10,
                    [])
    breakers.zone("z2").trip(10)
    cs = [candidate("a"), candidate("b", zone="z1"), candidate("c", zone="z2")]
    assert ids(filters.BreakerClosed().filter(context(breakers=breakers), cs)) == ["b"]


def test_kv_free_scorer():
    cs = [candidate("a", load_at=10), candidate("b")]
    cs[0].load = report("a", free=25, max_blocks=100).models["m"]
    assert scorers.KvFreeScorer().score(context(), cs) == [0.25, scorers.UNKNOWN]


def test_queue_scorer_counts_engine_queue_and_unreported_reservations():
    a = candidate("a")
    a.load = report("a", active=4, waiting=4, batch=8).models["m"]  # queue = batch → 1/2
    b = candidate("b", pending=8)  # no report: 8 reservations against the default scale (8)
    c = candidate("c")
    assert scorers.QueueScorer().score(context(), [a, b, c]) == [0.5, 0.5, 1.0]


def test_prefix_scorer_is_the_matched_share_of_the_chain():
    prefix = PrefixIndex()
    prefix.record("m", [1, 2, 3, 4], "a")
    prefix.record("m", [1, 2], "b")
    ctx = context(query(hashes=[1, 2, 3, 9]), prefix=prefix)
    assert scorers.PrefixScorer().score(ctx, [candidate("a"), candidate("b"),
                                              candidate("c")]) == [0.75, 0.5, 0.0]
    assert scorers.PrefixScorer().score(context(query()), [candidate("a")]) == [0.0]


def test_zone_scorer():
    cs = [candidate("a", zone="z1"), candidate("b", zone="z2")]
    assert scorers.ZoneScorer().score(context(query(zone="z2")), cs) == [0.0, 1.0]
    assert scorers.ZoneScorer().score(context(query()), cs) == [0.0, 0.0]


@pytest.mark.parametrize("scorer", list(scorers.SCORERS.values()), ids=list(scorers.SCORERS))
def test_every_scorer_stays_in_range(scorer):
    prefix = PrefixIndex()
    prefix.record("m", [1, 2], "a")
    cs = [candidate("a", load_at=10, pending=100, zone="z"), candidate("b"),
          candidate("c", load_at=10)]
    cs[2].load = LoadReport("c", 10, {}).models.get("m")
    values = scorer.score(context(query(hashes=[1, 2, 3], zone="z"), prefix=prefix), cs)
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)


def test_cache_spread_scorer_prefers_the_replica_holding_fewest_blocks():
    prefix = PrefixIndex()
    prefix.record("m", [1, 2, 3, 4], "a")
    prefix.record("m", [5, 6], "b")
    cs = [candidate("a"), candidate("b"), candidate("c")]
    assert scorers.CacheSpreadScorer().score(context(prefix=prefix), cs) == [0.0, 0.5, 1.0]
    assert scorers.CacheSpreadScorer().score(context(), cs) == [1.0, 1.0, 1.0]
