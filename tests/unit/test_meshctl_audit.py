"""`meshctl audit verify | prove | consistency | check-proof` on a log's files."""

from __future__ import annotations

import json
import pathlib

import pytest
from typer.testing import CliRunner

from meshctl.audit import audit_app
from services.auditor import store
from services.auditor.checkpoints import Signer, public_raw

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    signer = Signer.load_or_create(tmp_path / "signing.key")
    directory = tmp_path / "auditor"
    with store.AuditLog.open(directory, signer,
                             store.LogOptions(segment_max_bytes=2048)) as audit_log:
        for n in range(1, 31):
            audit_log.append([{"event_id": f"ev-{n}", "request_id": f"req-{n}",
                               "generation": {"tenant": "acme"}}])
            if n % 10 == 0:
                audit_log.checkpoint()
    (tmp_path / "public.hex").write_text(public_raw(signer.public_key).hex())
    return directory


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(audit_app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_verify_passes_then_names_an_edited_record(data_dir: pathlib.Path) -> None:
    code, out, _ = run("verify", "--data-dir", str(data_dir))
    assert (code, out.startswith("audit log OK: records 1..30")) == (0, True), out
    segment = store.list_segments(data_dir)[1]
    lines = segment.log_path.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"tenant":"acme"', b'"tenant":"evil"')
    segment.log_path.write_bytes(b"".join(lines))
    code, out, _ = run("verify", "--data-dir", str(data_dir))
    assert code == 1 and f"BROKEN at record {segment.first}" in out


def test_prove_prints_a_proof_a_third_party_can_check(data_dir, tmp_path) -> None:
    public = (tmp_path / "public.hex").read_text()
    code, out, err = run("prove", "req-17", "--data-dir", str(data_dir), "--public-key", public)
    assert code == 0 and "proof OK" in err, err
    proof = json.loads(out)
    assert (proof["sequence"], proof["checkpoint"]["size"]) == (17, 30)
    (tmp_path / "proof.json").write_text(out)
    code, out, _ = run("check-proof", str(tmp_path / "proof.json"), "--public-key", public)
    assert (code, out.strip()) == (0, "proof OK")
    proof["record"] = proof["record"].replace("req-17", "req-71")
    (tmp_path / "lie.json").write_text(json.dumps(proof))
    code, out, _ = run("check-proof", str(tmp_path / "lie.json"), "--public-key", public)
    assert code == 1 and "BROKEN" in out
    code, _, err = run("prove", "req-nope", "--data-dir", str(data_dir))
    assert code == 1 and "no audit record" in err


def test_consistency_between_two_checkpoints(data_dir, tmp_path) -> None:
    code, out, err = run("consistency", "10", "--data-dir", str(data_dir))
    assert code == 0 and "proof OK" in err, err
    assert (json.loads(out)["old"]["size"], json.loads(out)["new"]["size"]) == (10, 30)
    (tmp_path / "consistency.json").write_text(out)
    public = (tmp_path / "public.hex").read_text()
    code, out, _ = run("check-proof", str(tmp_path / "consistency.json"), "--public-key", public)
    assert (code, out.strip()) == (0, "proof OK")
    code, _, err = run("consistency", "11", "--data-dir", str(data_dir))
    assert code == 1 and "no signed checkpoint of a tree of 11" in err
