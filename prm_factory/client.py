"""A client of a served ensemble export (``prm-factory export``, then the OpenAI-compatible vLLM server): the PRM as
a reward function for an RL loop, and ``prm-factory score --url``.

It tokenizes nothing: it sends each trajectory's prompt and steps as text to ``POST {url}/pooling`` and the
server's own tokenizer and step rule do the rest (``tasks.prm.step_tags``: a step is a line; every step but the
last ends with ``"\\n"``). A row the server refuses (a step off its tag, a text past the context) comes back with
the server's reason, naming the row; the other rows are scored all the same. Connection errors, timeouts and
5xx answers are retried a bounded number of times with a doubling pause, then ``ServerUnavailable`` says where
and how often it tried. Standard library only, so a reward function needs nothing else installed.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tasks.evaluation.ruler import cut_at_newlines
from tasks.prm.model import StepScores


def split_steps(completion: str) -> list[str]:
    """A policy's completion as the server's steps: its lines, each with its newline (the last may have none)."""
    return cut_at_newlines(completion)


class ServerUnavailable(ConnectionError):
    """The server did not answer (or answered 5xx) after every retry, or refused the API key."""


class RowRefused(ValueError):
    """The server refused a trajectory; the message names it and says why."""


@dataclass
class RowResult:
    """One trajectory's per-step ensemble mean and std, each head's probability, or the server's refusal."""

    means: list[float] | None = None
    stds: list[float] | None = None
    head_probs: list[list[float]] | None = None
    error: str | None = None


def request_headers(api_key: str | None = None) -> dict[str, str]:
    """JSON, and the key as vLLM's ``--api-key`` expects it (a bearer token) when there is one."""
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def post_rows(url: str, rows: Sequence[dict[str, Any]], *, api_key: str | None = None, timeout: float = 120.0,
              retries: int = 3, backoff: float = 0.5) -> dict[str, Any]:
    """One ``/pooling`` request for ``rows`` ({"prompt", "steps"}); the response's ``data``. RowRefused when the
    server refuses the whole request (HTTP 400, its message), ServerUnavailable after ``retries`` retries."""
    body = json.dumps({"data": {"rows": [{"prompt": r["prompt"], "steps": list(r["steps"])} for r in rows]}})
    headers = request_headers(api_key)
    endpoint = url.rstrip("/") + "/pooling"
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["data"]
        except urllib.error.HTTPError as err:
            detail = _error_message(err)
            if err.code == 401:
                raise ServerUnavailable(f"{endpoint} refused the API key ({detail}); pass the server's --api-key"
                                        ) from None
            if err.code < 500:
                raise RowRefused(detail) from None
            last = f"HTTP {err.code}: {detail}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    raise ServerUnavailable(f"no answer from {endpoint} after {retries + 1} tries ({last}); is the server up? "
                            "(serve.json in the export holds its command)")


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(err.read())
    except (ValueError, OSError):
        return str(err)
    inner = payload.get("error", payload) if isinstance(payload, dict) else payload
    return str(inner.get("message", inner) if isinstance(inner, dict) else inner)


def score_steps(url: str, prompt: str, steps: Sequence[str], api_key: str | None = None, **options: Any
                ) -> tuple[list[float], list[float]]:
    """(per-step ensemble means, per-step stds) of one trajectory; RowRefused with the server's reason."""
    row = post_rows(url, [{"prompt": prompt, "steps": steps}], api_key=api_key, **options)["rows"][0]
    if "error" in row:
        raise RowRefused(row["error"])
    return row["step_means"], row["step_stds"]


def _result(row: dict[str, Any]) -> RowResult:
    """A scored row of the response (null: a step cut off by the context) with NaN for null."""
    def nan(xs: list[float | None]) -> list[float]:
        return [math.nan if x is None else float(x) for x in xs]

    return RowResult(nan(row["step_means"]), nan(row["step_stds"]), [nan(p) for p in row.get("head_probs", [])])


def _renamed(message: str, index: int) -> str:
    """The server's reason for one row ("... row i: why", i within the request) as "row INDEX: why"."""
    found = re.search(r"row \d+: (.*)$", message, flags=re.S)
    return f"row {index}: {found.group(1) if found else message}"


def score_rows(url: str, prompts: Sequence[str], completions: Sequence[Sequence[str]], *, batch_size: int = 16,
               max_in_flight: int = 4, api_key: str | None = None, first_row: int = 0,
               server_info: dict[str, Any] | None = None, latencies: list[float] | None = None,
               **options: Any) -> list[RowResult]:
    """Every trajectory, ``batch_size`` to a request with up to ``max_in_flight`` requests at once, in the order
    given. A request the server refuses whole is resent row by row, so each refused row gets its own reason; rows
    are named from ``first_row``. ``server_info`` (a dict) gets the response's other fields (the checkpoint's
    config hash, the step tag); ``latencies`` (a list) each request's seconds."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
    if batch_size < 1 or max_in_flight < 1:
        raise ValueError(f"batch_size and max_in_flight must be >= 1, got {batch_size} and {max_in_flight}")
    rows = [{"prompt": p, "steps": list(c)} for p, c in zip(prompts, completions, strict=True)]

    def one_batch(start: int) -> list[RowResult]:
        chunk = rows[start:start + batch_size]
        t0 = time.perf_counter()
        try:
            data = post_rows(url, chunk, api_key=api_key, **options)
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)
        except RowRefused as err:
            if len(chunk) == 1:
                return [RowResult(error=_renamed(str(err), first_row + start))]
            return [r for i in range(len(chunk)) for r in one_row(start + i)]
        if server_info is not None:
            server_info.update({k: v for k, v in data.items() if k != "rows"})
        return [RowResult(error=_renamed(r["error"], first_row + start + i)) if "error" in r else _result(r)
                for i, r in enumerate(data["rows"])]

    def one_row(index: int) -> list[RowResult]:
        try:
            r = post_rows(url, [rows[index]], api_key=api_key, **options)["rows"][0]
        except RowRefused as err:
            return [RowResult(error=_renamed(str(err), first_row + index))]
        return [RowResult(error=_renamed(r["error"], first_row + index)) if "error" in r else _result(r)]

    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        batches = list(pool.map(one_batch, range(0, len(rows), batch_size)))
    return [r for batch in batches for r in batch]


@dataclass
class RemotePRM:
    """``score(prompts, completions)`` like ``LoadedPRM``, through a running server: what ``score --url`` runs.
    A refused row scores NaN at every step (null in JSONL) and is counted in ``refused``, with its reason."""

    url: str
    api_key: str | None = None
    max_in_flight: int = 4
    options: dict[str, Any] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=lambda: {"config_hash": None})
    max_length: str = "server's"
    truncations: int = 0
    rows_sent: int = 0

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[StepScores]:
        info: dict[str, Any] = {}
        results = score_rows(self.url, prompts, completions, batch_size=batch_size, max_in_flight=self.max_in_flight,
                             api_key=self.api_key, first_row=self.rows_sent, server_info=info, **self.options)
        self.rows_sent += len(prompts)
        if info.get("checkpoint_config_hash"):
            self.config["config_hash"] = info["checkpoint_config_hash"]
        out = []
        for result, steps in zip(results, completions, strict=True):
            if result.error is not None:
                self.refused.append(result.error)
                out.append(StepScores([math.nan] * len(steps), [math.nan] * len(steps), False))
            else:
                out.append(StepScores(result.means, result.stds, False))
        return out
