"""Judges on realistic model replies: each case is a reply a real model could give, with the verdict a human
grader would give."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from prefill_router.collect.judges import (
    check_reference,
    extract_choice,
    extract_number,
    judge_choice,
    judge_contains,
    judge_exact,
    judge_numeric,
    normalize_text,
)
from prefill_router.collect.llm_judge import (
    JudgeConfig,
    LLMJudge,
    build_judge_messages,
    load_judge_config,
    parse_judge_score,
)
from prefill_router.collect.openai_api import RetryPolicy
from prefill_router.errors import ConfigError
from prefill_router.serve.fake_upstream import Answer, Fail, FakeUpstream, Raw

# --------------------------------------------------------------------------------------------- choice

CHOICE_CASES = [
    ("The answer is (C)", "C"),
    ("The answer is (C).", "C"),
    ("C.", "C"),
    ("C", "C"),
    ("c", "C"),
    ("(B)", "B"),
    ("**C**", "C"),
    ("**(D)**", "D"),
    ("Answer: c", "C"),
    ("Answer: B", "B"),
    ("ANSWER: E", "E"),
    ("Final Answer: J", "J"),
    ("The correct answer is: **B. Paris**", "B"),
    ("The correct option is D.", "D"),
    ("The answer is therefore B.", "B"),
    ("So the answer would be A.", "A"),
    ("Let's think step by step. Water boils at 100 C at sea level, so the answer is (A).", "A"),
    ("A. Paris", "A"),
    ("B) 42", "B"),
    ("(D) None of the above", "D"),
    ("C: mitochondria", "C"),
    ("**B.** The mitochondria produces ATP.", "B"),
    ("Option C is correct.", "C"),
    ("I think the answer is B.", "B"),
    ("Answer: I think it's D.", "D"),
    ("A good question! Looking at the options, the answer is (D).", "D"),
    ("First, (A) is wrong because X. Then (B) is wrong too. The answer is (C).", "C"),
    ("The answer is C. Some might argue for B, but the answer is D.", "D"),
    ("$\\boxed{G}$", "G"),
    ("Therefore the final answer is \\boxed{(H)}.", "H"),
    ("After careful analysis I pick B.", "B"),
    ("The answer is [E]", "E"),
    ("answer: (f)", "F"),
    # Replies that commit to nothing must not be read as "A" or "I"
    ("A good point, but I cannot decide between the options.", None),
    ("The answer is a bit subtle and depends on context.", None),
    ("I don't know.", None),
    ("A. Paris\nB. London\nC. Rome\nD. Berlin", None),
    ("", None),
    ("It could be (A) or (B).", None),
    ("The capital of France is Paris.", None),
]


@pytest.mark.parametrize("reply,letter", CHOICE_CASES)
def test_extract_choice(reply, letter):
    assert extract_choice(reply) == letter


def test_choice_letters_outside_the_option_set_are_ignored():
    assert extract_choice("The answer is (G)", letters="ABCD") is None
    assert extract_choice("The answer is (D)", letters="ABCD") == "D"


def test_judge_choice_scores_against_reference_forms():
    assert judge_choice("The answer is (C).", "C") == 1.0
    assert judge_choice("The answer is (C).", "(C)") == 1.0
    assert judge_choice("The answer is (C).", 2) == 1.0  # 0-based option index
    assert judge_choice("The answer is (C).", "B") == 0.0
    assert judge_choice("I don't know.", "A") == 0.0  # no answer is a wrong answer, not a free A
    with pytest.raises(ValueError, match="not a letter"):
        judge_choice("C", "Paris")
    with pytest.raises(ValueError, match="outside"):
        judge_choice("C", 12)


# --------------------------------------------------------------------------------------------- numeric

NUMERIC_CASES = [
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day, making 9 * 2 = $18.\n#### 18", 18.0),
    ("#### 1,234", 1234.0),
    ("The answer is 42.", 42.0),
    ("The answer is $1,234.50.", 1234.5),
    ("Answer: -7", -7.0),
    ("The temperature dropped to -3.5 degrees.", -3.5),
    ("It costs $5. So the total is $25.", 25.0),
    ("She has 3 apples, buys 4 more, so she has 7 apples.", 7.0),
    ("The probability is 45%.", 45.0),
    ("45%", 45.0),
    ("The answer is \\boxed{72}.", 72.0),
    ("Thus $\\boxed{\\frac{3}{4}}$", 0.75),
    ("x = \\frac{1}{2}", 0.5),
    ("The ratio is 3/4.", 0.75),
    ("Final answer: 0.25", 0.25),
    ("Speed = 60 km/h. Time = 2 h. Distance = 120 km", 120.0),
    ("He runs 3 sprints 3 times a week, 60 meters each: 3*3*60 = 540 meters.", 540.0),
    ("The result is 1.5e3", 1500.0),
    ("answer: .5", 0.5),
    ("The loss is \u2212 12? No: the loss is \u221212.", -12.0),
    ("-$5", -5.0),
    ("It costs -$20 after the refund", -20.0),
    ("COVID-19 cases rose by 250.", 250.0),
    ("Pages 3-4 cover it; the answer is 10", 10.0),
    ("The answer is 18 dollars per 3 days.", 18.0),
    ("1,000,000", 1000000.0),
    ("There are 2,500 students; 40% of them is 1,000.", 1000.0),
    ("Step 1. Add. Step 2. The total is 15", 15.0),
    ("The answer would be 7 cookies.", 7.0),
    ("So x = 3.14159", 3.14159),
    ("10 - 5 = 5", 5.0),
    ("I cannot determine the value.", None),
    ("", None),
]


@pytest.mark.parametrize("reply,value", NUMERIC_CASES)
def test_extract_number(reply, value):
    got = extract_number(reply)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value)


def test_fractions_can_be_turned_off():
    assert extract_number("The ratio is 3/4.", fractions=False) is None
    assert extract_number("It is 3/4 or 7.", fractions=False) == 7.0


def test_judge_numeric_reference_forms_and_tolerance():
    gsm8k_reference = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n"
                       "#### 72")
    assert judge_numeric("She sold 72 clips altogether.", gsm8k_reference) == 1.0
    assert judge_numeric("She sold 71 clips.", gsm8k_reference) == 0.0
    assert judge_numeric("The answer is $1,000.", "1000") == 1.0
    assert judge_numeric("The answer is 0.1 + 0.2 = 0.30000000000000004", 0.3) == 1.0
    assert judge_numeric("The answer is 0.75", ["3/4", "0.8"]) == 1.0
    assert judge_numeric("I don't know", "5") == 0.0
    with pytest.raises(ValueError, match="no number"):
        judge_numeric("5", "five")


# --------------------------------------------------------------------------------------------- exact

EXACT_CASES = [
    ("Paris", "Paris", 1.0),
    ("paris", "Paris", 1.0),
    ("Paris.", "Paris", 1.0),
    ("  Paris  ", "Paris", 1.0),
    ("PARIS!", "paris", 1.0),
    ("The Eiffel Tower", "Eiffel Tower", 1.0),
    ("the eiffel tower.", "The Eiffel Tower", 1.0),
    ("Answer: Paris", "Paris", 1.0),
    ("Final answer - Paris", "Paris", 1.0),
    ("The answer is Paris.", "Paris", 1.0),
    ("\"Paris\"", "Paris", 1.0),
    ("New  York\nCity", "New York City", 1.0),
    ("new-york city", "New York City", 1.0),
    ("George Washington", "george washington", 1.0),
    ("an apple", "Apple", 1.0),
    ("Caf\u00e9", "Caf\u00e9", 1.0),
    ("\uff30\uff41\uff52\uff49\uff53", "Paris", 1.0),  # full-width letters (NFKC)
    ("True", "true", 1.0),
    ("NO", "no", 1.0),
    ("1945", "1945", 1.0),
    ("Lyon", ["Paris", "Lyon"], 1.0),
    ("Paris, France", "Paris", 0.0),
    ("It is Paris", "Paris", 0.0),
    ("Pariss", "Paris", 0.0),
    ("London", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("Paris Hilton", "Paris", 0.0),
    ("George Washington Carver", "George Washington", 0.0),
    ("false", "true", 0.0),
    ("1944", "1945", 0.0),
    ("Marseille", ["Paris", "Lyon"], 0.0),
]


@pytest.mark.parametrize("reply,reference,score", EXACT_CASES)
def test_judge_exact(reply, reference, score):
    assert judge_exact(reply, reference) == score


def test_normalize_text():
    assert normalize_text("  The  Eiffel-Tower! ") == "eiffel tower"
    assert normalize_text("A.") == "a" and judge_exact("a", "A") == 1.0 and judge_contains("(A)", "A") == 1.0
    with pytest.raises(ValueError, match="empty"):
        judge_exact("x", " ... ")


# --------------------------------------------------------------------------------------------- contains

CONTAINS_CASES = [
    ("The capital of France is Paris.", "Paris", 1.0),
    ("Paris", "Paris", 1.0),
    ("I believe it's PARIS, the city of light.", "paris", 1.0),
    ("It was signed in 1776 in Philadelphia.", "1776", 1.0),
    ("The author is George Orwell.", "George Orwell", 1.0),
    ("The author is george   orwell", "George Orwell", 1.0),
    ("Orwell wrote it (George Orwell, that is).", "George Orwell", 1.0),
    ("Answer: H2O", "H2O", 1.0),
    ("Water's formula is H2O.", "h2o", 1.0),
    ("The Eiffel Tower is in Paris.", "the eiffel tower", 1.0),
    ("It's the mitochondria!", "mitochondria", 1.0),
    ("Either Lyon or Paris.", ["Marseille", "Lyon"], 1.0),
    ("The answer: New-York City", "New York", 1.0),
    ("Yes, definitely.", "yes", 1.0),
    ("The element is gold (Au).", "Au", 1.0),
    ("Einstein published it in 1905.", "1905", 1.0),
    ("Shakespeare wrote Hamlet.", "Hamlet", 1.0),
    ("The largest planet is Jupiter.", "jupiter", 1.0),
    ("It is caf\u00e9 au lait.", "Caf\u00e9", 1.0),
    ("The answer is 42 apples.", "42", 1.0),
    ("The capital of Italy is Rome.", "Paris", 0.0),
    ("Parisian cafes are nice.", "Paris", 0.0),  # whole words only
    ("It was signed in 17760.", "1776", 0.0),
    ("The author is George Eliot.", "George Orwell", 0.0),
    ("The answer is 420.", "42", 0.0),
    ("", "Paris", 0.0),
    ("Orwell.", "George Orwell", 0.0),
    ("Yesterday.", "yes", 0.0),
    ("Goldfish.", "gold", 0.0),
    ("I don't know.", "Paris", 0.0),
    ("Marseille.", ["Paris", "Lyon"], 0.0),
]


@pytest.mark.parametrize("reply,reference,score", CONTAINS_CASES)
def test_judge_contains(reply, reference, score):
    assert judge_contains(reply, reference) == score


def test_check_reference_refuses_unusable_references():
    check_reference("choice", "B")
    check_reference("numeric", "#### 18")
    check_reference("exact", ["Paris", "Lyon"])
    for kind, ref in [("choice", "Paris"), ("numeric", "many"), ("exact", "  "), ("contains", []),
                      ("bogus", "x")]:
        with pytest.raises(ValueError):
            check_reference(kind, ref)


# --------------------------------------------------------------------------------------------- llm

@pytest.mark.parametrize("reply,score", [
    ("SCORE: 1", 1.0),
    ("The candidate matches the reference.\nSCORE: 0.8", 0.8),
    ("score = 0", 0.0),
    ("**Score:** 0.5", 0.5),
    ("Score: 0.2 at first glance... on reflection SCORE: 0.9", 0.9),
    ('{"score": 0.75, "reason": "mostly right"}', 0.75),
    ("0.6", 0.6),
    ("SCORE: 80%", 0.8),
])
def test_parse_judge_score(reply, score):
    assert parse_judge_score(reply) == pytest.approx(score)


@pytest.mark.parametrize("reply", ["", "The answer is correct.", "SCORE: 7", "SCORE: -0.1", "7/10",
                                   '{"verdict": "yes"}', "true"])
def test_parse_judge_score_refuses_garbage(reply):
    with pytest.raises(ValueError):
        parse_judge_score(reply)


def test_judge_messages_carry_question_answer_and_reference():
    messages = build_judge_messages("What is 2+2?", "4", "4", rubric="Grade it.")
    assert messages[0] == {"role": "system", "content": "Grade it."}
    assert "What is 2+2?" in messages[1]["content"] and "Reference answer:\n4" in messages[1]["content"]
    assert "Reference answer" not in build_judge_messages("Q", "A", None)[1]["content"]


def test_load_judge_config_names_bad_fields(tmp_path):
    good = tmp_path / "judge.yaml"
    good.write_text("judge:\n  name: grader\n  base_url: http://127.0.0.1:1/v1\nrubric: Be strict.\n")
    assert load_judge_config(good).rubric == "Be strict."
    bad = tmp_path / "bad.yaml"
    bad.write_text("judge:\n  name: grader\n  base_url: ftp://x\n")
    with pytest.raises(ConfigError, match="judge.base_url"):
        load_judge_config(bad)


def test_llm_judge_against_a_fake_judge_server():
    """Scores parsed from real HTTP replies; garbage, errors and non-JSON bodies become recorded failures."""
    def grade(body: dict) -> str:
        user = body["messages"][-1]["content"]
        candidate = user.split("Candidate answer:\n")[-1]
        if candidate == "garbage":
            return "I'd say it looks fine overall!"
        return "Matches the reference.\nSCORE: 1" if candidate == "Paris" else "Wrong city.\nSCORE: 0"

    with FakeUpstream(Answer(grade), name="judge") as up:
        config = JudgeConfig.model_validate({"judge": {"name": "grader", "base_url": up.base_url},
                                             "max_tokens": 32})
        waits: list[float] = []

        async def no_sleep(seconds: float) -> None:
            waits.append(seconds)

        async def run():
            async with httpx.AsyncClient() as client:
                judge = LLMJudge(config, client, RetryPolicy(max_attempts=2, backoff_s=0.01), sleep=no_sleep)
                out = [await judge.score("Capital of France?", a, "Paris") for a in ("Paris", "Lyon", "garbage")]
                up.script(Fail(503), Fail(503))
                out.append(await judge.score("Capital of France?", "Paris", "Paris"))
                up.script(Raw(200, "<html>oops</html>"))
                out.append(await judge.score("Capital of France?", "Paris", "Paris"))
                return out

        results = asyncio.run(run())
        assert results[0] == (1.0, None)
        assert results[1] == (0.0, None)
        assert results[2][0] is None and "unreadable" in results[2][1]
        assert results[3][0] is None and "HTTP 503" in results[3][1] and "2 attempts" in results[3][1]
        assert results[4][0] is None and "not JSON" in results[4][1]
        body = up.requests[0].body
        assert body["temperature"] == 0 and body["max_tokens"] == 32
        assert json.dumps(body["messages"]).count("Capital of France?") == 1
