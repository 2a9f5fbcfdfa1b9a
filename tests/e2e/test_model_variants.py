"""The test-made second version of the demo model really is different: in this process, with the
project's torch engine, its greedy answer to the demo question is not the original's."""

from __future__ import annotations

import pytest

from tests.e2e.model_variants import demo_model_dir, greedy_answer, write_variant

pytestmark = pytest.mark.integration


def test_the_variant_answers_the_demo_question_differently(tmp_path):
    original = greedy_answer(demo_model_dir())
    variant_dir = write_variant(tmp_path / "variant")
    variant = greedy_answer(variant_dir)
    assert original == "The capital of France is Paris."
    assert variant and variant != original
    assert sorted(p.name for p in variant_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
