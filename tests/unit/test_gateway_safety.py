"""The stream safety filter: blocked phrases end the output and are never sent, even split
across chunks; without phrases text passes straight through."""

from services.gateway.safety import StreamFilter


def run(phrases: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    safety = StreamFilter(phrases)
    sent = []
    for piece in pieces:
        text, blocked = safety.feed(piece)
        sent.append(text)
        if blocked:
            return "".join(sent), True
    return "".join(sent) + safety.flush(), False


def test_a_phrase_split_across_chunks_is_caught_and_never_sent():
    assert run(("secret plan",), ["the sec", "ret pl", "an is here"]) == ("the ", True)
    assert run(("Secret Plan",), ["THE SECRET PLAN"]) == ("THE ", True)


def test_text_is_held_back_only_as_long_as_needed():
    safety = StreamFilter(("abcd",))
    assert safety.feed("hello ") == ("hel", False)  # 3 characters could start "abcd"
    assert safety.feed("world") == ("lo wo", False)
    assert safety.flush() == "rld"


def test_no_phrases_no_holdback():
    assert StreamFilter(()).feed("anything at all") == ("anything at all", False)
    assert run(("never",), ["clean ", "text"]) == ("clean text", False)
