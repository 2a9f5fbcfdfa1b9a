import copy

import pytest

from services.common import errors
from services.registry.catalog import ModelCatalog
from services.registry.manifest import parse_ref, validate_manifest, version_id

MANIFEST = {
    "name": "demo",
    "description": "d",
    "triton_model_name": "reference",
    "tokenizer": "whitespace",
    "engine": {"context_window": 4096, "max_output_tokens": 1024, "max_batch_size": 8},
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
    for bad in ("", "Demo", "demo@sha256:xyz", "demo@Bad"):
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
