"""What the adapter makes of Triton's answers, without a server."""

import pytest

from backends.triton.adapter import engine_process_gone


@pytest.mark.parametrize("message, gone", [
    ("Stub process 'smollm2_0_0' is not healthy.", True),  # Triton 2.51's Python backend
    ("Stub process 'reference_0_0' is not healthy.", True),
    ("engine stopped (torch engine)", True),  # our dispatcher ended: the process lives on
    ("the torch engine failed: prompt too long", False),  # about the request, not the replica
    ("the prompt is not healthy", False),  # an engine's own words never count
    ("", False),
])
def test_only_a_dead_engine_process_is_the_replicas_failure(message, gone):
    assert engine_process_gone(message) is gone
