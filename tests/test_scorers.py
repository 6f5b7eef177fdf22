"""The shipped scorers grade answers the way their benchmarks do."""

from __future__ import annotations

from trials.scorers import boxed, last_boxed


def test_boxed_grades_the_final_boxed_answer() -> None:
    thinking = "<think>Maybe \\boxed{3}? No.</think> So the answer is \\boxed{\\dfrac{1}{2}}."
    assert boxed(thinking, "\\frac{1}{2}") == 1.0
    assert boxed(thinking, "The answer is $\\boxed{\\frac12}$") == 0.0  # a different form
    assert boxed("x = \\boxed{ 4 }.", "\\boxed{4}") == 1.0
    assert boxed("no box here: 4", "4") == 0.0
    assert boxed("\\boxed{\\left(1, 2\\right)}", "(1,2)") == 1.0


def test_a_box_cut_off_by_max_new_tokens_is_no_answer() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2") is None
    assert last_boxed("a \\boxed{x^{2}} b") == "x^{2}"
