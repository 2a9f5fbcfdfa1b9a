"""The embedded stack's state files: what `meshctl` reads to find the stack, owner-only."""

from __future__ import annotations

import pathlib
import stat

from deploy.local.state import StackInfo, forget_state, load_state, write_state


def test_state_round_trips_owner_only_and_is_forgotten(tmp_path: pathlib.Path) -> None:
    info = StackInfo(
        gateway="127.0.0.1:1", api_key="imk_secret", model="demo-chat",
        reference_model="demo-reference", etcd="127.0.0.1:2",
        endpoints={"registry": "127.0.0.1:3", "triton": "127.0.0.1:4",
                   "prometheus": "127.0.0.1:5", "scheduler": "127.0.0.1:8",
                   "auditor": "127.0.0.1:9"},
        metrics={"triton": "127.0.0.1:6"}, pids={"etcd": 7}, mesh_token="token")
    (tmp_path / "env").write_text("stale")
    (tmp_path / "env").chmod(0o644)  # left by an older run
    write_state(tmp_path, info)
    assert load_state(tmp_path) == info
    for name in ("env", "operator-env", "stack.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    env = (tmp_path / "env").read_text()
    assert "export INFERMESH_API_KEY=imk_secret" in env
    assert "export INFERMESH_SCHEDULER=127.0.0.1:8" in env
    assert "export INFERMESH_AUDITOR=127.0.0.1:9" in env
    forget_state(tmp_path)
    assert load_state(tmp_path) is None and not (tmp_path / "env").exists()
    assert not (tmp_path / "operator-env").exists()


def test_only_operator_env_holds_the_operators_certificate(tmp_path: pathlib.Path) -> None:
    """Every client of a TLS stack gets its CA; the operator's certificate (an etcd admin, a
    caller of the internal admin reads) only goes to whoever sources `operator-env`."""
    tls_dir = tmp_path / "tls"
    info = StackInfo(
        gateway="127.0.0.1:1", api_key="imk_secret", model="demo-chat",
        reference_model="demo-reference", etcd="127.0.0.1:2",
        endpoints={"registry": "127.0.0.1:3", "triton": "127.0.0.1:4",
                   "prometheus": "127.0.0.1:5", "scheduler": "127.0.0.1:8",
                   "auditor": "127.0.0.1:9"},
        metrics={"triton": "127.0.0.1:6"}, pids={}, tls_dir=str(tls_dir))
    write_state(tmp_path, info)
    env, operator_env = ((tmp_path / name).read_text() for name in ("env", "operator-env"))
    assert f"export INFERMESH_TLS_CA_FILE={tls_dir / 'ca.pem'}" in env
    assert "INFERMESH_TLS_CERT_FILE" not in env and "INFERMESH_TLS_KEY_FILE" not in env
    assert info.client_env() == {"INFERMESH_TLS_CA_FILE": str(tls_dir / "ca.pem")}
    assert operator_env.startswith(env.rsplit("export INFERMESH_TLS_CA_FILE", 1)[0])
    assert f"export INFERMESH_TLS_CERT_FILE={tls_dir / 'operator.pem'}" in operator_env
    assert f"export INFERMESH_TLS_KEY_FILE={tls_dir / 'operator.key'}" in operator_env
