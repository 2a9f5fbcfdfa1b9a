import pytest

from services.common import errors
from services.common.tenancy import TenantPlan
from services.gateway.requests import ChatTurn, GenerationRequest, Principal, SamplingRequest
from services.gateway.tokenizers import WhitespaceTokenizer
from services.gateway.validation import Limits, validate, validate_request_id
from services.registry.manifest import ModelVersion

VERSION = ModelVersion("sha256:" + "0" * 64, {
    "name": "demo", "tokenizer": "whitespace",
    "engine": {"kind": "reference", "context_window": 100, "max_output_tokens": 50},
    "sampling": {"max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
})
PRINCIPAL = Principal("t", "k", "user", TenantPlan(max_output_tokens=40, max_context_tokens=90))


def request(**kw):
    sampling = kw.pop("sampling", SamplingRequest())
    return GenerationRequest(request_id="r1", model="demo", **{"prompt": "hello world", **kw},
                             sampling=sampling)


def check(req):
    return validate(req, PRINCIPAL, VERSION, Limits(), WhitespaceTokenizer())


def test_defaults_come_from_the_version():
    engine = check(request()).engine
    assert engine.max_tokens == 16 and engine.temperature == 0.7 and engine.top_p == 0.9
    # The version's own model.
    assert engine.top_k is None and engine.triton_model_name == "demo-000000000000"


@pytest.mark.parametrize(
    "kwargs,field,limit",
    [
        ({"sampling": SamplingRequest(max_tokens=0)}, "params.max_tokens", "1..40"),
        ({"sampling": SamplingRequest(max_tokens=41)}, "params.max_tokens", "1..40"),
        ({"sampling": SamplingRequest(temperature=2.5)}, "params.temperature", "[0, 2]"),
        ({"sampling": SamplingRequest(top_p=0.0)}, "params.top_p", "(0, 1]"),
        ({"sampling": SamplingRequest(top_k=-1)}, "params.top_k", "[0, 1000]"),
        ({"sampling": SamplingRequest(stop=("a",) * 5)}, "params.stop", "at most 4"),
        ({"sampling": SamplingRequest(stop=("",))}, "params.stop[0]", "1..128"),
        ({"sampling": SamplingRequest(min_tokens=17)}, "params.min_tokens", "[0, 16]"),
        ({"sampling": SamplingRequest(logit_bias=((1, 0.5),) * 301)}, "params.logit_bias",
         "at most 300"),
        ({"sampling": SamplingRequest(logit_bias=((1, 100.5),))}, "params.logit_bias",
         "[-100, 100]"),
        ({"sampling": SamplingRequest(logit_bias=((-1, 1.0),))}, "params.logit_bias",
         "negative"),
        ({"sampling": SamplingRequest(logit_bias=((2**31, 1.0),))}, "params.logit_bias",
         "not in the vocabulary (0..2147483647)"),
        ({"sampling": SamplingRequest(presence_penalty=2.5)}, "params.presence_penalty",
         "[-2, 2]"),
        ({"prompt": "   "}, "prompt", "required"),
        ({"prompt": "w " * 80}, "prompt", "context window of 90 tokens"),
        ({"timeout_s": 0.0}, "timeout", "(0, 600]"),
        ({"user": "u" * 300}, "user", "at most 256"),
        ({"priority": 9}, "priority", "unknown"),
        ({"prompt": None, "messages": ()}, "messages", "1..256"),
        ({"prompt": None, "messages": (ChatTurn("robot", "x"),)}, "messages[0].role", "one of"),
    ],
)
def test_bad_fields_are_named_with_their_limit(kwargs, field, limit):
    with pytest.raises(errors.InvalidArgument) as raised:
        check(request(**kwargs))
    assert raised.value.field == field
    assert limit in raised.value.message


def test_logit_bias_takes_the_reference_engines_own_token_ids():
    """One definition of the reference engine's ids: a word's id as the tokenizer gives it (the
    ids its KV blocks are hashed over) is in the vocabulary logit_bias is checked against."""
    ids = WhitespaceTokenizer().token_ids("hello world zebra")
    assert max(ids) >= 65_536  # xxh32 ids, not a 16-bit vocabulary
    biased = check(request(sampling=SamplingRequest(logit_bias=tuple((i, 5.0) for i in ids))))
    assert biased.engine.logit_bias == tuple((i, 5.0) for i in ids)


def test_messages_are_rendered():
    turns = (ChatTurn("system", "be brief"), ChatTurn("user", "hi"))
    validated = check(request(prompt=None, messages=turns))
    assert validated.engine.prompt == "system: be brief\nuser: hi\nassistant:"
    assert validated.prompt_tokens == 6
    assert validated.engine.prompt.endswith("assistant:")


def test_request_id_checked_or_generated():
    assert len(validate_request_id("")) == 32
    assert validate_request_id("abc-1") == "abc-1"
    with pytest.raises(errors.InvalidArgument):
        validate_request_id("has space")


@pytest.mark.parametrize("kind, isolated, salt", [
    ("reference", True, "t"), ("reference", False, ""),
    ("torch", True, "t"), ("torch", False, ""),  # its prefix sharing is partitioned too
    ("unknown", True, ""),  # a kind that declares no cache_salt is sent none
])
def test_an_isolated_tenants_engine_request_carries_its_cache_salt(kind, isolated, salt):
    version = ModelVersion("sha256:" + "1" * 64, {
        "name": "demo", "tokenizer": "whitespace",
        "engine": {"kind": kind, "context_window": 100, "max_output_tokens": 50},
        "sampling": {"max_tokens": 16, "temperature": 0.7, "top_p": 0.9}})
    principal = Principal("t", "k", "user", TenantPlan(isolate_prefix_cache=isolated))
    assert principal.prefix_salt == ("t" if isolated else "")
    engine = validate(request(), principal, version, Limits(), WhitespaceTokenizer()).engine
    assert engine.cache_salt == salt
