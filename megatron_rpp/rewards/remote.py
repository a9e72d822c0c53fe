"""Score responses with a remote HTTP endpoint: batched JSON, a timeout, bounded retries, loud failures.

Protocol (one ``POST`` per chunk of at most ``batch_size`` samples; B = samples in the chunk)::

    request  (Content-Type: application/json)
        {"prompts": [str] * B, "responses": [str] * B, "samples": [dict] * B}
    reply    (status 200)
        [float] * B        or        {"rewards": [float] * B}

Sample values JSON cannot encode are sent as their ``str()``. Connection errors, timeouts
and HTTP 5xx/429 are retried with exponential backoff (``backoff_s · 2^k``), at most
``max_retries`` times; any other HTTP status is an error at once. A reply of the wrong
length, a non-number or a NaN/infinite reward is an error naming the endpoint and the
sample — never retried, swallowed or zeroed. See docs/rewards.md for an example server.

Before the run builds any model, :meth:`RemoteRewardScorer.check_reachable` opens (and
closes) a TCP connection to the endpoint's host and port, with the same retries: a wrong
or dead URL stops the run in seconds, not after the engines have started.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from megatron_rpp.rewards.scorer import RewardError, describe_sample
from megatron_rpp.utils import console


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, 5xx/429); carries a one-line reason."""


class RemoteRewardScorer:
    """Scores (prompt, response, sample) triples by POSTing them to ``url`` (same interface as RewardScorer).

    ``timeout_s`` bounds the connection and each read of the reply; a chunk gets at most
    ``1 + max_retries`` attempts, so an endpoint that stays down stops the run after about
    ``(1 + max_retries) · timeout_s + backoff_s · (2^max_retries − 1)`` seconds.
    """

    def __init__(self, url: str, timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
                 batch_size: int = 256):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"remote reward url {url!r} must start with http:// or https://")
        self.url, self.timeout_s, self.max_retries = url, timeout_s, max_retries
        self.backoff_s, self.batch_size = backoff_s, batch_size

    def __call__(self, prompts: list[str], responses: list[str], samples: list[dict]) -> list[float]:
        if not len(prompts) == len(responses) == len(samples):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(samples)} samples")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            end = min(start + self.batch_size, len(prompts))
            reply = self._post_with_retries(prompts[start:end], responses[start:end], samples[start:end], start)
            rewards += self._check(reply, prompts, responses, start, end)
        return rewards

    def close(self) -> None:
        """Nothing to release: every request opens and closes its own connection."""

    # -- one chunk -------------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Connect to the endpoint's host and port (no request is sent), retrying like a request.

        Where the environment routes the URL through a proxy (``http_proxy`` / ``https_proxy``,
        as urllib does for the requests), the proxy is what must accept the connection.
        """
        host, port = _first_hop(self.url)

        def connect() -> None:
            try:
                socket.create_connection((host, port), timeout=self.timeout_s).close()
            except TimeoutError:
                raise _Transient(f"no connection within {self.timeout_s:g}s") from None
            except OSError as e:
                raise _Transient(f"{type(e).__name__}: {e.strerror or e}") from None

        self._with_retries(connect, f"cannot connect to {host}:{port}", "the start-up check")

    def _post_with_retries(self, prompts: list[str], responses: list[str], samples: list[dict], start: int):
        body = json.dumps({"prompts": prompts, "responses": responses, "samples": samples}, default=str).encode()
        where = f"samples {start}..{start + len(prompts) - 1}"
        return self._with_retries(lambda: self._post(body), f"no valid reply for {where}", where)

    def _with_retries(self, action, failure: str, where: str):
        """``action()``, retried with backoff while it raises ``_Transient``; then a RewardError."""
        attempts = 1 + self.max_retries
        for attempt in range(1, attempts + 1):
            try:
                return action()
            except _Transient as e:
                if attempt == attempts:
                    raise RewardError(f"remote reward {self.url}: {failure} after {attempts} "
                                      f"attempts (timeout {self.timeout_s:g}s each): {e}") from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                console.say(f"{console.PREFIX} WARNING remote reward {self.url}: attempt {attempt}/{attempts} for "
                            f"{where} failed ({e}); retrying in {delay:.2g}s", err=True)
                time.sleep(delay)

    def _post(self, body: bytes):
        """One request -> the decoded JSON reply; ``_Transient`` for what a retry may fix."""
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:  # a status other than 2xx (before URLError: a subclass)
            detail = f"HTTP {e.code} {e.reason}: {_head(e.read())}"
            if _retryable_status(e.code):
                raise _Transient(detail) from None
            raise RewardError(f"remote reward {self.url}: {detail}") from None
        except TimeoutError:
            raise _Transient(f"no reply within {self.timeout_s:g}s") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RewardError(f"remote reward {self.url}: reply is not JSON ({e}); it starts {_head(raw)}") from None

    def _check(self, reply, prompts: list[str], responses: list[str], start: int, end: int) -> list[float]:
        """``[float] * B`` or ``{"rewards": [float] * B}`` -> the list, every value a finite number."""
        values = reply.get("rewards") if isinstance(reply, dict) else reply
        n = end - start
        if not isinstance(values, list):
            raise RewardError(f"remote reward {self.url}: expected a JSON list of {n} numbers or "
                              f'{{"rewards": [...]}}, got {_head(json.dumps(reply).encode())}')
        if len(values) != n:
            raise RewardError(f"remote reward {self.url}: returned {len(values)} rewards for {n} samples "
                              f"(samples {start}..{end - 1})")
        for k, v in enumerate(values):
            idx = start + k
            problem = ("not a number" if isinstance(v, bool) or not isinstance(v, (int, float))
                       else "not finite" if not math.isfinite(v) else None)
            if problem:
                raise RewardError(f"remote reward {self.url} returned {v!r} ({problem}) on "
                                  f"{describe_sample(idx, prompts[idx], responses[idx])}")
        return [float(v) for v in values]


def _first_hop(url: str) -> tuple[str, int]:
    """(host, port) a request to ``url`` connects to first: its proxy if urllib would use one."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parts.hostname or ""
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _head(raw: bytes, limit: int = 200) -> str:
    """The start of a reply body, for error messages."""
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")
