"""The audit log on disk: appends, rotation, recovery after a crash, retention, queries, proofs,
and `verify` naming the first record that was edited, removed, reordered or truncated."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest

from services.auditor import index, merkle, reader, store
from services.auditor.checkpoints import Checkpoint, Signer
from services.auditor.records import GENESIS_HASH, parse_line
from services.auditor.verify import format_result, verify
from services.common import errors


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def event(n: int, tenant: str = "acme", model: str = "llama") -> dict[str, object]:
    return {"event_id": f"ev-{n}", "request_id": f"req-{n}", "source": "test",
            "generation": {"tenant": tenant, "model": model, "prompt_tokens": n}}


@pytest.fixture
def signer(tmp_path: pathlib.Path) -> Signer:
    return Signer.load_or_create(tmp_path / "keys" / "signing.key")


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "auditor"


def open_log(data_dir: pathlib.Path, signer: Signer, clock: Clock | None = None,
             **options: object) -> store.AuditLog:
    return store.AuditLog.open(data_dir, signer, store.LogOptions(**options),
                               clock=clock or Clock())


def fill(data_dir: pathlib.Path, signer: Signer, count: int, *, per_batch: int = 4,
         checkpoint_every: int = 3, **options: object) -> None:
    """`count` events in batches, a checkpoint every few batches, small segments."""
    options.setdefault("segment_max_bytes", 4096)
    with open_log(data_dir, signer, **options) as audit_log:
        for batch, start in enumerate(range(1, count + 1, per_batch)):
            audit_log.append([event(n) for n in range(start, min(start + per_batch, count + 1))])
            if batch % checkpoint_every == 0:
                audit_log.checkpoint()


def segment_lines(segment: store.Segment) -> list[bytes]:
    return segment.log_path.read_bytes().splitlines(keepends=True)


def rewrite(segment: store.Segment, lines: list[bytes]) -> None:
    segment.log_path.write_bytes(b"".join(lines))


def segments(data_dir: pathlib.Path) -> list[store.Segment]:
    return store.list_segments(data_dir)


def test_appends_are_chained_merkle_leaves_under_signed_checkpoints(data_dir, signer) -> None:
    with open_log(data_dir, signer) as audit_log:
        first = audit_log.append([event(1), event(2)])
        second = audit_log.append([event(3)])
        checkpoint = audit_log.checkpoint()
    assert (first.sequences, first.appended, second.last_sequence) == ([1, 2], 2, 3)
    lines = segment_lines(segments(data_dir)[0])
    records = [parse_line(line) for line in lines]
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev == GENESIS_HASH
    assert [r.prev for r in records[1:]] == [r.hash for r in records[:-1]]
    assert json.loads(lines[0])["event"] == event(1)
    assert list(json.loads(lines[0])) == ["seq", "at", "prev", "event", "hash"]
    assert checkpoint is not None and checkpoint.size == 3
    assert checkpoint.root == merkle.root_of(merkle.leaf_hash(line[:-1]) for line in lines)
    assert checkpoint.signed_by({signer.key_id: signer.public_key})
    result = verify(data_dir)
    assert (result.ok, result.first_sequence, result.last_sequence) == (True, 1, 3)
    assert result.root == checkpoint.root and result.checkpoints >= 2
    assert format_result(result).startswith("audit log OK: records 1..3")


def test_retried_events_are_stored_once_even_after_a_restart(data_dir, signer) -> None:
    fill(data_dir, signer, 40)
    with open_log(data_dir, signer, dedupe_window=100) as audit_log:
        result = audit_log.append([event(3), event(41), event(41), event(39)])
        assert (result.appended, result.duplicates) == (1, 3)
        assert result.sequences == [3, 41, 41, 39]
    with open_log(data_dir, signer, dedupe_window=0) as audit_log:
        assert audit_log.append([event(3)]).appended == 1  # the window is off: stored again


def test_segments_rotate_by_size_and_by_age(data_dir, signer) -> None:
    clock = Clock()
    with open_log(data_dir, signer, clock, segment_max_bytes=1000,
                  segment_max_age_s=60) as audit_log:
        for n in range(1, 11):
            audit_log.append([event(n)])
        by_size = len(segments(data_dir))
        clock.now += 61
        audit_log.append([event(11)])
        audit_log.append([event(12)])
    assert by_size > 2
    assert len(segments(data_dir)) == by_size + 1
    assert segments(data_dir)[-1].first == 11  # the open segment was 61 s old at record 11
    for segment in segments(data_dir):
        base = next(reader.segment_checkpoints(segment))
        assert base.size == segment.first - 1 and base.frontier_state().size == base.size
    assert verify(data_dir).ok


def test_a_torn_tail_is_cut_kept_aside_and_the_chain_continues(data_dir, signer) -> None:
    fill(data_dir, signer, 10, segment_max_bytes=1 << 20)
    segment = segments(data_dir)[-1]
    with open(segment.log_path, "ab") as file:
        file.write(b'{"seq":11,"at":1,"prev":"')  # a crash in the middle of a write
    with open(segment.checkpoint_path, "ab") as file:
        file.write(b'{"schema":1,"si')
    assert verify(data_dir).torn_tail_bytes > 0
    with open_log(data_dir, signer) as audit_log:
        assert audit_log.head.sequence == 10
        assert audit_log.append([event(11)]).last_sequence == 11
    assert list(segment.directory.glob("*.torn-*"))
    result = verify(data_dir)
    assert (result.ok, result.last_sequence, result.torn_tail_bytes) == (True, 11, 0)


def test_restart_replays_only_what_follows_the_newest_checkpoint(data_dir, signer) -> None:
    fill(data_dir, signer, 60)
    # An old record is damaged: start-up does not read it (its cost does not grow with the
    # log), but verification names it.
    first = segments(data_dir)[0]
    lines = segment_lines(first)
    lines[1] = lines[1].replace(b'"prompt_tokens":2', b'"prompt_tokens":9')
    rewrite(first, lines)
    with open_log(data_dir, signer) as audit_log:
        assert audit_log.head.sequence == 60
    result = verify(data_dir)
    assert (result.ok, result.first_bad_sequence) == (False, 2)


def test_the_writer_refuses_a_log_cut_below_its_checkpoint(data_dir, signer) -> None:
    fill(data_dir, signer, 12, per_batch=1, checkpoint_every=1, segment_max_bytes=1 << 20)
    segment = segments(data_dir)[-1]
    rewrite(segment, segment_lines(segment)[:-3])
    with pytest.raises(store.LogCorrupted, match="acknowledged records are missing"):
        open_log(data_dir, signer)


def test_the_writer_refuses_to_chain_onto_an_edited_record(data_dir, signer) -> None:
    fill(data_dir, signer, 5, per_batch=1, checkpoint_every=100, segment_max_bytes=1 << 20)
    segment = segments(data_dir)[-1]
    lines = segment_lines(segment)
    lines[-1] = lines[-1].replace(b'"tenant":"acme"', b'"tenant":"acmf"')
    rewrite(segment, lines)
    with pytest.raises(store.LogCorrupted, match="record 5"):
        open_log(data_dir, signer)


def test_a_second_writer_is_refused(data_dir, signer) -> None:
    with open_log(data_dir, signer), pytest.raises(store.LogBusy):
        open_log(data_dir, signer)


def test_events_without_an_id_are_refused_before_anything_is_written(data_dir, signer) -> None:
    with open_log(data_dir, signer) as audit_log:
        with pytest.raises(errors.InvalidArgument) as raised:
            audit_log.append([event(1), {"request_id": "x"}])
        assert raised.value.field == "event_id"
        assert audit_log.head.sequence == 0


# -- verify names what was done to the records -------------------------------------------------

@pytest.fixture
def tampered(data_dir, signer) -> pathlib.Path:
    fill(data_dir, signer, 60)
    return data_dir


def middle(data_dir: pathlib.Path) -> store.Segment:
    return segments(data_dir)[len(segments(data_dir)) // 2]


def test_verify_names_an_edited_record(tampered) -> None:
    segment = middle(tampered)
    lines = segment_lines(segment)
    lines[2] = lines[2].replace(b'"tenant":"acme"', b'"tenant":"evil"')
    rewrite(segment, lines)
    result = verify(tampered)
    assert (result.ok, result.first_bad_sequence) == (False, segment.first + 2)
    assert "does not match its hash" in result.problem
    assert f"BROKEN at record {segment.first + 2}" in format_result(result)


def test_verify_names_a_removed_record(tampered) -> None:
    segment = middle(tampered)
    lines = segment_lines(segment)
    del lines[1]
    rewrite(segment, lines)
    result = verify(tampered)
    assert (result.ok, result.first_bad_sequence) == (False, segment.first + 1)
    assert "removed or reordered" in result.problem


def test_verify_names_swapped_records(tampered) -> None:
    segment = middle(tampered)
    lines = segment_lines(segment)
    lines[1], lines[2] = lines[2], lines[1]
    rewrite(segment, lines)
    result = verify(tampered)
    assert (result.ok, result.first_bad_sequence) == (False, segment.first + 1)


def test_verify_names_a_truncated_tail(tampered) -> None:
    segment = segments(tampered)[-1]
    lines = segment_lines(segment)
    kept = len(lines) - 3
    rewrite(segment, lines[:kept])
    result = verify(tampered)
    assert (result.ok, result.first_bad_sequence) == (False, segment.first + kept)
    assert "truncated" in result.problem


def test_verify_names_a_removed_segment(tampered) -> None:
    segment = middle(tampered)
    segment.log_path.unlink()
    segment.checkpoint_path.unlink()
    result = verify(tampered)
    assert (result.ok, result.first_bad_sequence) == (False, segment.first)
    assert "segment was removed" in result.problem


def test_verify_catches_a_suffix_rewritten_with_recomputed_hashes(tampered) -> None:
    """Someone without the signing key rebuilds a valid-looking chain: checkpoints catch it."""
    segment = segments(tampered)[-2]
    lines = segment_lines(segment)
    records = [parse_line(line) for line in lines]
    rebuilt, prev = [], records[0].prev
    for record in records:
        altered = dict(record.event, source="forged")
        new, line = type(record).create(record.seq, record.at, prev, altered)
        rebuilt.append(line)
        prev = new.hash
    rewrite(segment, rebuilt)
    result = verify(tampered)
    assert not result.ok
    assert segment.first <= result.first_bad_sequence <= segment.first + len(lines)
    assert "do not match the signed checkpoint" in result.problem


def test_verify_catches_a_forged_checkpoint(tampered) -> None:
    segment = middle(tampered)
    raw = segment.checkpoint_path.read_bytes().splitlines(keepends=True)
    value = json.loads(raw[-1])
    value["size"] += 1
    raw[-1] = (json.dumps(value) + "\n").encode()
    segment.checkpoint_path.write_bytes(b"".join(raw))
    result = verify(tampered)
    assert not result.ok and "not signed by a trusted key" in result.problem


def test_verify_with_a_checkpoint_from_outside_catches_a_lost_tail(data_dir, signer) -> None:
    """The newest checkpoint in etcd catches a cut the log's own files cannot show."""
    fill(data_dir, signer, 20, segment_max_bytes=1 << 20)
    with open_log(data_dir, signer) as audit_log:
        audit_log.append([event(21), event(22)])
        published = audit_log.checkpoint()
    segment = segments(data_dir)[-1]
    rewrite(segment, segment_lines(segment)[:-2])
    ckpt = segment.checkpoint_path.read_bytes().splitlines(keepends=True)
    segment.checkpoint_path.write_bytes(b"".join(ckpt[:-2]))  # close() signed one more
    assert verify(data_dir).ok  # the files alone look complete …
    result = verify(data_dir, trusted=[published])  # … the published checkpoint does not
    assert (result.ok, result.first_bad_sequence) == (False, 21)


def test_verify_trusts_only_the_keys_it_is_given(tampered, tmp_path) -> None:
    other = Signer.load_or_create(tmp_path / "other.key")
    result = verify(tampered, keys={other.key_id: other.public_key})
    assert not result.ok and "not signed by a trusted key" in result.problem


# -- retention ---------------------------------------------------------------------------------

def test_retention_drops_old_segments_and_the_rest_still_verifies(data_dir, signer) -> None:
    clock = Clock()
    with open_log(data_dir, signer, clock, segment_max_bytes=2000) as audit_log:
        for n in range(1, 41):
            audit_log.append([event(n)])
            clock.now += 1
        before = segments(data_dir)
        cutoff = int((clock.now - 15) * 1000)
        dropped = audit_log.drop_segments(cutoff)
        view = audit_log.view()
        checkpoint = audit_log.checkpoint() or audit_log.latest_checkpoint
        proof = reader.inclusion_proof(view, 40, checkpoint)
    assert dropped and dropped == [s.first for s in before[:len(dropped)]]
    first = segments(data_dir)[0].first
    assert all(parse_line(line).at >= cutoff - 2000
               for line in segment_lines(segments(data_dir)[0])[-1:])
    result = verify(data_dir)
    assert (result.ok, result.first_sequence, result.last_sequence) == (True, first, 40)
    assert proof.check({signer.key_id: signer.public_key}) == ""
    # Deleting one more segment than retention did is caught: the signed floor says `first`.
    segments(data_dir)[0].log_path.unlink()
    segments(data_dir)[0].checkpoint_path.unlink()
    broken = verify(data_dir)
    assert (broken.ok, broken.first_bad_sequence) == (False, first)
    assert "beyond retention" in broken.problem


# -- reading: queries and proofs ---------------------------------------------------------------

def test_query_filters_by_tenant_model_request_and_time(data_dir, signer) -> None:
    clock = Clock()
    with open_log(data_dir, signer, clock, segment_max_bytes=1500) as audit_log:
        for n in range(1, 31):
            audit_log.append([event(n, tenant="acme" if n % 2 else "zeta",
                                    model="llama" if n <= 20 else "mistral")])
            clock.now += 10
        view = audit_log.view()

    def seqs(**where: object) -> list[int]:
        return [r.seq for r, _ in reader.query(view, reader.QueryFilter(**where))]

    assert seqs(tenant="zeta", model="mistral") == [22, 24, 26, 28, 30]
    assert seqs(request_id="req-7") == [7]
    base = int(Clock().now * 1000)
    assert seqs(since_ms=base + 100_000, until_ms=base + 130_000) == [11, 12, 13]
    assert seqs(tenant="acme", limit=3) == [1, 3, 5]
    assert reader.find_sequence(view, "req-30") == 30
    with pytest.raises(errors.NotFound):
        reader.find_sequence(view, "req-nope")


def test_queries_read_only_the_sealed_segments_their_index_allows(
    data_dir, signer, monkeypatch
) -> None:
    clock = Clock()
    with open_log(data_dir, signer, clock, segment_max_bytes=1500) as audit_log:
        for n in range(1, 61):
            audit_log.append([event(n, tenant="zeta" if n == 17 else "acme",
                                    model="mistral" if n > 50 else "llama")])
            clock.now += 10
        view = audit_log.view()
    sealed = view.segments[:-1]
    assert len(sealed) >= 4
    assert index.build_missing(data_dir) == len(sealed)
    assert index.build_missing(data_dir) == 0  # every index is current
    read: list[int] = []
    real_lines = reader.lines

    def counting_lines(segment_view, start=1):
        read.append(segment_view.segments[0].first)
        return real_lines(segment_view, start)

    monkeypatch.setattr(reader, "lines", counting_lines)

    def query(**where: object) -> tuple[list[int], list[int]]:
        read.clear()
        found = [r.seq for r, _ in reader.query(view, reader.QueryFilter(**where))]
        return found, list(read)

    holding = [s.first for s in sealed if s.first <= 17][-1]
    newest = view.segments[-1].first
    assert query(tenant="zeta") == ([17], [holding, newest])
    assert query(request_id="req-17") == ([17], [holding, newest])
    late = int((Clock().now + 300) * 1000)  # record 31 on
    found, segments_read = query(since_ms=late, model="llama")
    assert found == list(range(31, 51))
    firsts = [s.first for s in view.segments]
    # Sealed segments with a record from 31 on and a llama record (all after 50 are mistral).
    wanted = [f for f, after in itertools.pairwise(firsts) if after - 1 >= 31 and f <= 50]
    assert segments_read == [*wanted, newest] and len(wanted) < len(sealed)
    # An index that no longer matches its segment's file is rebuilt, never trusted.
    first_index = json.loads(sealed[0].index_path.read_text())
    first_index["log_bytes"] += 1
    first_index["tenants"] = []
    sealed[0].index_path.write_text(json.dumps(first_index))
    assert query(tenant="acme", limit=1)[0] == [1]
    # A Bloom filter says "maybe" for what it holds and, here, "no" for what it does not.
    summary = index.load_or_build(sealed[0])
    assert summary is not None and summary.request_ids.may_contain("req-1")
    assert not any(summary.request_ids.may_contain(f"absent-{n}") for n in range(20))


def test_retention_removes_a_dropped_segments_index(data_dir, signer) -> None:
    clock = Clock()
    with open_log(data_dir, signer, clock, segment_max_bytes=2000) as audit_log:
        for n in range(1, 41):
            audit_log.append([event(n)])
            clock.now += 1
        index.build_missing(data_dir)
        first = segments(data_dir)[0]
        assert first.index_path.exists()
        assert audit_log.drop_segments(int((clock.now - 15) * 1000))
    assert not first.index_path.exists()
    assert verify(data_dir).ok


def test_inclusion_and_consistency_proofs_check_and_catch_a_lie(data_dir, signer) -> None:
    fill(data_dir, signer, 50)
    view = reader.view_of(data_dir)
    keys = reader.local_keys(data_dir)
    newest = view.checkpoint
    assert newest is not None and newest.size == 50
    for sequence in (1, 2, 17, 33, 50):
        proof = reader.inclusion_proof(view, sequence, newest)
        assert proof.check(keys) == "", sequence
        again = reader.InclusionProof.from_json(json.loads(reader.proof_to_text(proof)))
        assert again.check(keys) == ""
    proof = reader.inclusion_proof(view, 17, newest)
    lie = reader.InclusionProof(17, proof.leaf.replace(b"acme", b"acmf"), proof.path, newest)
    assert "not in the signed tree" in lie.check(keys)
    old = reader.checkpoint_covering(view, 20)
    consistency = reader.consistency_proof(view, old, newest)
    assert consistency.check(keys) == ""
    swapped = reader.ConsistencyProof(old, newest, consistency.path[::-1])
    assert swapped.check(keys) != "" or len(consistency.path) < 2
    forged = reader.ConsistencyProof(
        Checkpoint(old.size, b"\x00" * 32, old.head, old.first, old.at, old.key_id,
                   old.signature), newest, consistency.path)
    assert "not signed" in forged.check(keys)
