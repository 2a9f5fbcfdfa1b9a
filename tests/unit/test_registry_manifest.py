import copy

import pytest

from services.common import errors
from services.registry.catalog import ModelCatalog
from services.registry.manifest import (
    diff_manifests,
    parse_ref,
    served_model_name,
    validate_manifest,
    version_id,
)
from services.registry.rollout import Routing

MANIFEST = {
    "name": "demo",
    "description": "d",
    "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 4096, "max_output_tokens": 1024,
               "max_batch_size": 8},
    "sampling": {"max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "top_k": 0},
    "cost_per_1k_input_tokens": 0.1,
    "cost_per_1k_output_tokens": 0.2,
}


def test_version_id_is_content_address():
    same = copy.deepcopy(MANIFEST)
    assert version_id(MANIFEST) == version_id(same)
    assert version_id(MANIFEST).startswith("sha256:") and len(version_id(MANIFEST)) == 71
    same["description"] = "changed"
    assert version_id(MANIFEST) != version_id(same)


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("name",), "Bad Name", "manifest.name"),
        (("tokenizer",), "bpe?", "manifest.tokenizer"),
        (("engine", "context_window"), 0, "manifest.engine.context_window"),
        (("engine", "max_output_tokens"), 5000, "manifest.engine.max_output_tokens"),
        (("sampling", "max_tokens"), 2048, "manifest.sampling.max_tokens"),
        (("sampling", "top_p"), 0.0, "manifest.sampling.top_p"),
        (("cost_per_1k_input_tokens",), -1.0, "manifest.cost_per_1k_input_tokens"),
    ],
)
def test_invalid_manifest_names_the_field(path, value, field):
    manifest = copy.deepcopy(MANIFEST)
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(errors.InvalidArgument) as raised:
        validate_manifest(manifest)
    assert raised.value.field == field


def test_parse_ref_forms():
    assert parse_ref("demo").alias == "production"
    assert parse_ref("demo@canary").alias == "canary"
    pinned = "sha256:" + "a" * 64
    assert parse_ref(f"demo@{pinned}").version_id == pinned
    assert parse_ref("demo@production").explicit and not parse_ref("demo").explicit
    for bad in ("", "Demo", "demo@sha256:xyz", "demo@Bad", "demo@beta"):
        with pytest.raises(errors.InvalidArgument):
            parse_ref(bad)


def test_catalog_resolves_aliases_and_pins():
    vid = version_id(MANIFEST)
    catalog = ModelCatalog()
    catalog.rebuild({
        f"demo/versions/{vid}": {"version_id": vid, "manifest": MANIFEST},
        "demo/routing": {"aliases": {"production": vid, "previous": ""}},
        "demo/history/00000000000000000001": {"alias": "production"},
    })
    assert catalog.resolve("demo").version_id == vid
    assert catalog.resolve(f"demo@{vid}").version_id == vid
    with pytest.raises(errors.NotFound):
        catalog.resolve("demo@canary")
    with pytest.raises(errors.NotFound):
        catalog.resolve("other")
    with pytest.raises(errors.NotFound):
        catalog.resolve("demo@sha256:" + "b" * 64)
    assert [e.name for e in catalog.models()] == ["demo"]


def test_canonical_form_leaves_defaults_out():
    """A field added later at its default value (as protobuf prints it) keeps the id."""
    grown = copy.deepcopy(MANIFEST)
    grown["engine"].update(num_blocks=0, page_size=0, dtype="", tensor_parallelism=0)
    grown["weights"] = []
    grown["safety"] = {"blocked_phrases": []}
    assert version_id(grown) == version_id(MANIFEST)
    grown["engine"]["tensor_parallelism"] = 2
    assert version_id(grown) != version_id(MANIFEST)


def test_diff_names_fields_and_files():
    digest = "sha256:" + "ab" * 32
    after = copy.deepcopy(MANIFEST)
    after["sampling"]["temperature"] = 0.2
    after["weights"] = [{"name": "model.gguf", "digest": digest, "size_bytes": "10"}]
    assert diff_manifests(MANIFEST, after) == [
        ("sampling.temperature", 0.7, 0.2),
        ("weights[model.gguf].digest", None, digest),
        ("weights[model.gguf].size_bytes", None, "10"),
    ]
    assert diff_manifests(MANIFEST, copy.deepcopy(MANIFEST)) == []


def test_engine_and_safety_limits_name_the_field():
    for edit, field in [
        (lambda m: m["engine"].update(num_blocks=4, page_size=16), "manifest.engine.num_blocks"),
        (lambda m: m["engine"].update(num_blocks=4096), "manifest.engine.page_size"),
        (lambda m: m["engine"].update(tensor_parallelism=65),
         "manifest.engine.tensor_parallelism"),
        (lambda m: m.update(safety={"blocked_phrases": [" "]}),
         "manifest.safety.blocked_phrases[0]"),
        (lambda m: m["engine"].update(kind="tensorrt"), "manifest.engine.kind"),
        (lambda m: m["engine"].pop("kind"), "manifest.engine.kind"),
        (lambda m: m["engine"].update(kind="torch", num_blocks=64, page_size=64,
                                      max_batch_tokens=64), "manifest.weights"),
        (lambda m: m.update(cost_per_1k_output_tokens=float("inf")),
         "manifest.cost_per_1k_output_tokens"),
    ]:
        manifest = copy.deepcopy(MANIFEST)
        edit(manifest)
        with pytest.raises(errors.InvalidArgument) as raised:
            validate_manifest(manifest)
        assert raised.value.field == field


def test_catalog_routes_the_rollout_and_serves_pins_as_named():
    production, canary = dict(MANIFEST), dict(MANIFEST, description="canary")
    shadow = dict(MANIFEST, description="shadow")
    ids = [version_id(m) for m in (production, canary, shadow)]
    catalog = ModelCatalog()
    catalog.rebuild({
        **{f"demo/versions/{vid}": {"version_id": vid, "manifest": m}
           for vid, m in zip(ids, (production, canary, shadow), strict=True)},
        "demo/routing": Routing(revision=3, production=ids[0], canary=ids[1],
                                canary_weight_percent=50, shadow=ids[2],
                                shadow_rate=1.0).to_record(),
    })
    arms = {catalog.route("demo", "acme", f"u{i}", f"r{i}").arm for i in range(200)}
    assert arms == {"production", "canary"}
    routed = catalog.route("demo", "acme", "u1", "r1")
    assert routed.shadow is not None and routed.shadow.version_id == ids[2]
    for ref, expected in [("demo@production", ids[0]), ("demo@canary", ids[1]),
                          (f"demo@{ids[2]}", ids[2])]:
        pinned = catalog.route(ref, "acme", "u1", "r1")
        assert (pinned.arm, pinned.version.version_id, pinned.shadow) == ("pinned", expected, None)
    assert catalog.resolve("demo@shadow").version_id == ids[2]
    with pytest.raises(errors.NotFound):
        catalog.resolve("demo@previous")
    with pytest.raises(errors.InvalidArgument):
        catalog.route("demo@beta", "acme", "u1", "r1")


def test_the_rollout_moves_traffic_only_to_loaded_versions():
    new, old, canary = (dict(MANIFEST, description=d) for d in ("new", "old", "canary"))
    ids = [version_id(m) for m in (new, old, canary)]
    catalog = ModelCatalog()
    catalog.rebuild({
        **{f"demo/versions/{vid}": {"version_id": vid, "manifest": m}
           for vid, m in zip(ids, (new, old, canary), strict=True)},
        "demo/routing": Routing(revision=4, production=ids[0], previous=ids[1], canary=ids[2],
                                canary_weight_percent=100).to_record(),
    })
    names = {vid: served_model_name("demo", vid) for vid in ids}

    def route(*loaded: str, ref: str = "demo"):
        served = {names[vid] for vid in loaded}
        routed = catalog.route(ref, "acme", "u1", "r1", lambda model: model in served)
        return routed.arm, routed.version.version_id

    assert route(*ids) == ("canary", ids[2])
    assert route(ids[0], ids[1]) == ("production", ids[0])  # the canary is still loading
    assert route(ids[1]) == ("previous", ids[1])  # just promoted, still loading: the old one
    assert route() == ("production", ids[0])  # nothing loaded: production's UNAVAILABLE
    assert route(ids[1], ref=f"demo@{ids[2]}") == ("pinned", ids[2])  # a pin is as named
