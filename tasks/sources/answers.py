"""Final-answer extraction and checking: did a solution reach the gold answer?

Three checkers, picked by the problem's source in `check_answer`:

- numeric (GSM8K, numeric answers in the user's files): the final number of the text (after `####`, else in the
  last `\\boxed{}`, else after "answer is", else the last number), compared exactly when both are integers and
  with a small relative tolerance otherwise; commas, `$`, `%`, a trailing `.` and fractions like `3/4` are handled;
- MATH / ProcessBench: math-verify, bounded in time and safe off the main thread (see `math_equal`);
- toy world: exact integer string equality of `tasks.sources.toy_world.extract_answer`.

Every function here is pure except `math_equal`, which talks to a verifier subprocess.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

log = logging.getLogger(__name__)

REL_TOL = 1e-6  # for non-integer numeric answers: 0.333333 matches 1/3; integers must match exactly
MATH_TIMEOUT_S = 5.0
# What math-verify is asked to compare at all. Deeper or longer input is not decided but counted as not equal:
# sympy recurses per nesting level (a 200-deep \frac once came back *equal* to 1/2; 60 deep took the whole
# time limit), and real answers are far below both bounds (MATH-500: at most 6 levels of braces, 180 chars).
MAX_MATH_DEPTH = 24
MAX_MATH_CHARS = 2000

# A number as people and models write it: optional sign, thousands separators, decimals, a fraction.
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.)])-?(?:\$\s?)?(?:{_NUM})(?:\s?/\s?(?:{_NUM}))?")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_ANCHOR_RE = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")


# ---------------------------------------------------------------------------------------------------- numbers


def parse_number(text: str) -> Fraction | None:
    """The number `text` is (whole string), as an exact Fraction; None if it is not one number.

    Accepts `1,234`, `$5`, `-3.50`, `25%` (-> 25), `3/4`, `\\frac{3}{4}`, a trailing `.`; rejects `1/0`, words.
    """
    s = _FRAC_RE.sub(r"\1/\2", text.strip())
    s = s.replace("{,}", "").replace("\\$", "$").replace("\\%", "%").strip()
    s = s.rstrip(".").strip().removesuffix("%").strip()
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:].strip()
    s = s.removeprefix("$").strip()
    if not s or _NUMBER_RE.fullmatch(s) is None:
        return None
    num, _, den = s.partition("/")
    try:
        value = Fraction(num.replace(",", "").strip())
        if den:
            value /= Fraction(den.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None
    return sign * value


def numbers_close(a: Fraction, b: Fraction, rel_tol: float = REL_TOL) -> bool:
    """Equal if both are integers and identical, or within `rel_tol` (relative, floor 1e-9 absolute) otherwise.

    Integers compare exactly because a relative tolerance would call 109200000 and 109200001 equal.
    """
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none.

    Also takes the brace-less `\\boxed 5` form (up to the next whitespace or `$`).
    """
    matches = list(_BOXED_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            continue  # unbalanced: try an earlier one
        if i < len(text) and text[i] == " ":
            rest = re.match(r"\s+([^\s$]+)", text[i:])
            if rest:
                return rest.group(1)
    return None


def _numbers_in(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER_RE.finditer(_FRAC_RE.sub(r"\1/\2", text.replace("{,}", "")))]


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a solution or gold field, as written (None if there is no number).

    Priority: the text after the last `####` (GSM8K gold / many fine-tuned models), the last `\\boxed{}`, the
    first number after the last "answer is"/"answer:", the last number anywhere.
    """
    if "####" in text:
        found = _numbers_in(text.rsplit("####", 1)[1])
        return found[0] if found else None
    boxed = last_boxed(text)
    if boxed is not None:
        found = _numbers_in(boxed)
        return found[-1] if found else None
    anchors = list(_ANCHOR_RE.finditer(text))
    if anchors:
        found = _numbers_in(text[anchors[-1].end() :])
        if found:
            return found[0]
    found = _numbers_in(text)
    return found[-1] if found else None


def gsm8k_gold(answer_field: str) -> str:
    """The canonical gold answer of a GSM8K `answer` field: the number after `####`, without commas or `$`.

    Raises ValueError if there is no `####` or no number after it (the loader quarantines such rows).
    """
    if "####" not in answer_field:
        raise ValueError("no '####' in the answer")
    tail = answer_field.rsplit("####", 1)[1].strip()
    value = parse_number(tail)
    if value is None:
        raise ValueError(f"the text after '####' is not a number: {tail[:80]!r}")
    return tail.replace(",", "").replace("$", "").rstrip(".").strip()


def numeric_equal(pred_text: str, gold: str, rel_tol: float = REL_TOL) -> bool:
    """Whether the final number of `pred_text` equals the gold number (False if either has none)."""
    pred = extract_final_number(pred_text)
    want = parse_number(gold)
    if want is None:
        found = extract_final_number(gold)
        want = parse_number(found) if found is not None else None
    got = parse_number(pred) if pred is not None else None
    return got is not None and want is not None and numbers_close(got, want, rel_tol)


def normalize_text_answer(text: str) -> str:
    """A string answer for plain comparison: stripped of `$`, a trailing `.`, case and repeated whitespace."""
    s = " ".join(text.split())
    for _ in range(2):  # "$x$." and "$x.$" alike
        s = s.strip().rstrip(".").strip().strip("$")
    return s.strip().casefold()


# ------------------------------------------------------------------------------------------------ math-verify
#
# math-verify bounds its own work with signal.alarm, which raises outside the main thread (Prefect runs tasks in
# worker threads). We switch that off (parsing_timeout=None, timeout_seconds=None) and bound each comparison from
# outside instead: it runs in a long-lived child process that we can kill. A thread with a join timeout would be
# cheaper to start but cannot be stopped: a runaway sympy simplification would keep burning a core (and the GIL)
# for the life of the process. The child is a plain `python -c` (not multiprocessing): multiprocessing's spawn and
# forkserver re-import the parent's __main__, which breaks under stdin scripts and re-runs unguarded user scripts,
# and fork is unsafe in a process with threads. It costs ~1 s to start once; a call costs a pipe round trip. On a
# timeout the child is killed and a fresh one starts on the next call.

_VERIFIER_SRC = """
import json, logging, os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the reply pipe
logging.basicConfig(level=logging.ERROR)
from math_verify import parse, verify
out.write("ready\\n"); out.flush()
for line in sys.stdin:
    req = json.loads(line)
    try:
        ok = verify(parse(req["gold"], parsing_timeout=None), parse(req["pred"], parsing_timeout=None),
                    timeout_seconds=None)
    except Exception:  # defensive: whatever math-verify cannot compare is not equal
        ok = False
    out.write("1\\n" if ok else "0\\n"); out.flush()
"""


class _Verifier:
    """One child process running math-verify, answering (pred, gold) pairs as JSON lines over pipes."""

    STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy 2-core box can take a while; not part of a call's bound

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _VERIFIER_SRC], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = False

    def _reply(self, timeout_s: float) -> str | None:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if readable else None

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """The verdict, or None if the child overran `timeout_s` or died (the caller then kills it)."""
        assert self.proc.stdin is not None
        try:
            if not self.ready:
                if self._reply(self.STARTUP_TIMEOUT_S) != "ready":
                    return None
                self.ready = True
            self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
            self.proc.stdin.flush()
            reply = self._reply(timeout_s)
        except (OSError, ValueError):  # broken pipe: the child died
            return None
        return None if reply not in ("0", "1") else reply == "1"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class _VerifierPool:
    """Up to `size` verifier children, started on first use, shared by all threads of this process."""

    def __init__(self, size: int) -> None:
        self.idle: queue.LifoQueue[_Verifier | None] = queue.LifoQueue()
        for _ in range(size):
            self.idle.put(None)  # a slot whose child has not been started yet

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        verifier = self.idle.get() or _Verifier()
        verdict: bool | None = None
        try:
            verdict = verifier.compare(pred, gold, timeout_s)
        finally:
            if verdict is None:
                verifier.kill()
                verifier = None
            self.idle.put(verifier)
        return verdict


_POOL: _VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _VerifierPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _VerifierPool(size=max(1, min(4, os.cpu_count() or 1)))
        return _POOL


def _as_math(text: str) -> str:
    """A bare answer (`\\frac{\\pi}{2}`, `(3, 4)`) wrapped so math-verify parses it; delimited text unchanged."""
    return text if ("\\boxed" in text or "$" in text) else f"\\boxed{{{text}}}"


def math_equal(pred: str, gold: str, timeout_s: float = MATH_TIMEOUT_S) -> bool:
    """Whether `pred` and `gold` are mathematically equal, by math-verify, within `timeout_s` seconds.

    Both may be bare answers (`\\frac{3}{4}`, `(3, \\pi/2)`: wrapped in `\\boxed{}` for math-verify) or texts holding
    `\\boxed{}` / `$...$` (math-verify takes the last boxed answer). Prose with neither is read as one expression:
    `check_answer` handles free text. Safe from any thread. A comparison that overruns the bound returns False and
    logs a warning saying so (its child process is killed); so does input over the size and depth bounds
    (`math_too_complex`), before any work. Equal strings short-cut without math-verify.
    """
    return _math_verdict(_as_math(pred.strip()), _as_math(gold.strip()), timeout_s)


def math_too_complex(text: str) -> str | None:
    """Why math-verify will not be asked about `text` (None: it will): over MAX_MATH_CHARS or MAX_MATH_DEPTH.

    Depth counts nested braces, brackets and parentheses, the structure sympy recurses over.
    """
    if len(text) > MAX_MATH_CHARS:
        return f"{len(text)} characters, over the {MAX_MATH_CHARS} the math checker accepts"
    depth = deepest = 0
    for ch in text:
        if ch in "{[(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}])":
            depth = max(0, depth - 1)
    if deepest > MAX_MATH_DEPTH:
        return f"nesting depth {deepest}, over the {MAX_MATH_DEPTH} the math checker accepts"
    return None


def _math_verdict(pred: str, gold: str, timeout_s: float) -> bool:
    if pred in ("", "\\boxed{}") or gold in ("", "\\boxed{}"):
        return False
    if pred == gold:
        return True
    for text in (pred, gold):
        why = math_too_complex(text)
        if why is not None:
            log.warning("math_equal: not decided (%s); counted as not equal: %.80r", why, text)
            return False
    verdict = _pool().compare(pred, gold, timeout_s)
    if verdict is None:
        log.warning("math_equal: no verdict within %.3g s (timeout or verifier crash); counted as not equal: "
                    "pred=%.80r gold=%.80r", timeout_s, pred, gold)
        return False
    return verdict


# -------------------------------------------------------------------------------------------------- dispatcher


def check_answer(source: str, pred_text: str, gold: str, timeout_s: float = MATH_TIMEOUT_S) -> bool:
    """Whether a solution text reaches the gold answer, with the checker of the problem's source.

    - "gsm8k": numeric (`numeric_equal`);
    - "math", "processbench": the last `\\boxed{}` of the text (else the whole text) against gold by `math_equal`;
    - "jsonl", "parquet" (the user's files): numeric if the gold is a number, else normalised string equality of
      the last `\\boxed{}` (else the whole text);
    - "toy": `tasks.sources.toy_world.extract_answer(pred_text)` must equal the gold integer string exactly.

    Raises ValueError for an unknown source or an empty gold (ProcessBench rows carry none: meta has_gold=False).
    """
    if not gold.strip():
        raise ValueError(f"no gold answer to check against (source {source!r}); ProcessBench problems have none")
    if source == "toy":
        from tasks.sources.toy_world import extract_answer  # the toy world's own answer format; imported lazily

        got = extract_answer(pred_text)
        return got is not None and str(got) == gold.strip()
    if source == "gsm8k":
        return numeric_equal(pred_text, gold)
    if source in ("math", "processbench"):
        boxed = last_boxed(pred_text)
        if boxed is None:  # no boxed answer: let math-verify find one ("final answer is", the last $...$)
            return _math_verdict(pred_text.strip(), _as_math(gold.strip()), timeout_s)
        return math_equal(boxed, gold, timeout_s)
    if source in ("jsonl", "parquet"):
        if parse_number(gold) is not None:
            return numeric_equal(pred_text, gold)
        boxed = last_boxed(pred_text)
        return normalize_text_answer(pred_text if boxed is None else boxed) == normalize_text_answer(gold)
    raise ValueError(f"no answer checker for source {source!r}")
