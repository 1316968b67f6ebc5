"""What a name may contain (chatd.core.names), at an edge the other tests leave:
characters that have no Unicode name."""

from __future__ import annotations

import pytest

from chatd.core.names import name_problem


@pytest.mark.parametrize("ch", ["\x01", "\x1b", "\x7f", "\x85", "\x9f"])
def test_a_control_character_is_named_as_one(ch: str) -> None:
    # Control characters have no Unicode name: the problem says what they are.
    problem = name_problem(f"a{ch}b", 32)
    assert problem is not None
    assert problem.startswith("the name contains a control character")
