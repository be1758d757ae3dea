"""Answer extraction and checking: numeric (GSM8K), math-verify (MATH) bounded in time and off the main thread."""

from __future__ import annotations

import logging
import threading
import time
from fractions import Fraction

import pytest

from tasks.sources.answers import (
    check_answer,
    extract_final_number,
    gsm8k_gold,
    last_boxed,
    math_equal,
    normalize_text_answer,
    numeric_equal,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", Fraction(18)),
        ("1,080", Fraction(1080)),
        ("$1,234.50", Fraction(246900, 200)),
        ("-3", Fraction(-3)),
        ("-$5", Fraction(-5)),
        ("0.25.", Fraction(1, 4)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("25%", Fraction(25)),
        ("1/0", None),
        ("1,2", None),
        ("twelve", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes $18 a day.\n#### 18", "18"),
        ("so 16-3-4=9", "9"),  # the '-' of a subtraction is not a sign
        ("The answer is $1,234. Then 5 more words 7", "$1,234"),  # "answer is" beats the last number
        ("we get \\boxed{\\frac{3}{4}} and 2", "3/4"),
        ("x is -2.5.", "-2.5"),
        ("no digits here", None),
    ],
)
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_gsm8k_gold():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,080") == "1080"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("The answer is 18")
    with pytest.raises(ValueError, match="not a number"):
        gsm8k_gold("#### eighteen")


def test_numeric_equal_tolerance_and_integers():
    assert numeric_equal("so x = 0.75", "3/4")
    assert numeric_equal("it is 0.333333", "1/3")  # non-integers: relative tolerance 1e-6
    assert not numeric_equal("it is 0.33", "1/3")
    assert not numeric_equal("109200001", "109200000")  # integers compare exactly
    assert numeric_equal("The total is 1,080 dollars.", "1080")
    assert not numeric_equal("no number", "5")


def test_last_boxed_balanced_braces():
    text = r"first \boxed{1} then \boxed{\left( 3, \frac{\pi}{2} \right)}."
    assert last_boxed(text) == r"\left( 3, \frac{\pi}{2} \right)"
    assert last_boxed(r"\boxed{\frac{1}{2}} and a broken \boxed{a{b}") == r"\frac{1}{2}"
    assert last_boxed(r"so $\boxed 5$") == "5"
    assert last_boxed(r"\fbox{x+1}") == "x+1"
    assert last_boxed("none") is None


def test_math_equal_main_thread():
    assert math_equal(r"\frac{3}{4}", "0.75")
    assert math_equal(r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)")
    assert math_equal("p - q", "-q + p")
    assert not math_equal("3", "4")
    assert not math_equal("", "4")


def test_math_equal_from_worker_thread():
    """math-verify's signal.alarm fails off the main thread (Prefect workers); ours must not."""
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results["equal"] = math_equal(r"\dfrac{1}{2}", "0.5")
            results["unequal"] = math_equal(r"\sqrt{2}", "1.5")
        except BaseException as err:  # surfaced below: an exception in a thread is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == {"equal": True, "unequal": False}


def test_math_equal_timeout_returns_false_and_says_so(caplog):
    tower = r"2^{2^{2^{2^{2^{2^{2^{10}}}}}}}"  # sympy would grind on this far longer than the bound
    math_equal("1", "1.0")  # start the verifier first: its start-up is not part of a call's bound
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="tasks.sources.answers"):
        assert math_equal(tower, "5", timeout_s=0.5) is False
    assert time.perf_counter() - start < 5.0
    assert "no verdict within 0.5 s" in caplog.text
    assert math_equal(r"\frac{6}{8}", "0.75")  # a fresh verifier replaces the killed one


def test_check_answer_dispatch():
    assert check_answer("gsm8k", "She makes 9 * 2 = 18 dollars.\n#### 18", "18")
    assert not check_answer("gsm8k", "#### 17", "18")
    assert check_answer("math", r"... so the answer is $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}")
    assert check_answer("math", "Therefore, the final answer is $x^2+1$.", "1+x^2")  # no \boxed: math-verify finds it
    assert not check_answer("math", r"\boxed{2}", "3")
    assert check_answer("processbench", r"\boxed{4004}", "4004")
    assert check_answer("jsonl", "I think it is 42.", "42")  # numeric gold
    assert check_answer("parquet", r"The capital is \boxed{Paris.}", "paris")  # string gold, normalised
    assert not check_answer("jsonl", "London", "Paris")
    with pytest.raises(ValueError, match="no gold answer"):
        check_answer("processbench", r"\boxed{1}", "")
    with pytest.raises(ValueError, match="no answer checker"):
        check_answer("nope", "1", "1")


def test_check_answer_toy():
    from tasks.sources import toy_world as toy
    text = "Answer: 12"
    assert toy.extract_answer(text) == "12"
    assert check_answer("toy", text, "12")
    assert not check_answer("toy", text, "13")
    assert not check_answer("toy", "no answer line", "12")


def test_normalize_text_answer():
    assert normalize_text_answer("  $Paris$. ") == "paris"
    assert normalize_text_answer("New   York") == "new york"
