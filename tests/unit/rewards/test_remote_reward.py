"""Remote HTTP reward against a real local server: scores, retries, timeouts, a dead endpoint, bad replies."""
import math
import re
import time

import pytest

from megatron_rpp.config import ConfigError, load_config
from megatron_rpp.rewards import make_scorer
from megatron_rpp.rewards.remote import RemoteRewardScorer
from megatron_rpp.rewards.scorer import RewardError
from testlib.reward_server import RewardServer, fail, hang, raw, reply

PROMPTS, RESPONSES, SAMPLES = ["q0", "q1", "q2"], ["a", "bb", "ccc"], [{"answer": "1"}, {"answer": "2"}, {}]
EXPECTED = [0.1, 0.2, 0.3]  # len(response) / 10


@pytest.fixture
def server():
    with RewardServer() as s:
        yield s


def _scorer(url: str, **kw) -> RemoteRewardScorer:
    return RemoteRewardScorer(url, **{"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, **kw})


def test_scores_and_protocol(server):
    assert _scorer(server.url)(PROMPTS, RESPONSES, SAMPLES) == EXPECTED
    assert server.requests == [{"prompts": PROMPTS, "responses": RESPONSES, "samples": SAMPLES}]
    server.script = [reply({"rewards": [1, -2.5, 0]})]  # the dict form; ints are numbers
    assert _scorer(server.url)(PROMPTS, RESPONSES, SAMPLES) == [1.0, -2.5, 0.0]


def test_large_batches_are_split(server):
    responses = ["x" * k for k in range(5)]
    rewards = _scorer(server.url, batch_size=2)(["p"] * 5, responses, [{}] * 5)
    assert rewards == pytest.approx([k / 10 for k in range(5)], abs=0)
    assert [len(r["responses"]) for r in server.requests] == [2, 2, 1]


def test_a_500_is_retried(server, capsys):
    server.script = [fail(500)]
    assert _scorer(server.url)(PROMPTS, RESPONSES, SAMPLES) == EXPECTED
    assert len(server.requests) == 2  # the failed attempt + the retry
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attempt 1/3" in err[0] and "HTTP 500" in err[0] and server.url in err[0]


def test_a_hanging_request_times_out_and_is_retried(server):
    server.script = [hang(60.0)]
    t0 = time.perf_counter()
    assert _scorer(server.url, timeout_s=0.3)(PROMPTS, RESPONSES, SAMPLES) == EXPECTED
    elapsed = time.perf_counter() - t0
    assert len(server.requests) == 2
    # One 0.3 s timeout, then a retry that is answered (~0.35 s in all), not the server's 60 s:
    # the upper bound leaves a loaded machine 50x.
    assert 0.3 <= elapsed < 20, elapsed


def test_server_gone_stops_with_the_url_quickly(server):
    scorer = _scorer(server.url, max_retries=3, timeout_s=60.0)
    assert scorer(PROMPTS, RESPONSES, SAMPLES) == EXPECTED
    server.stop()
    t0 = time.perf_counter()
    url = re.escape(server.url)
    gone = rf"remote reward {url}: no valid reply for samples 0..2 after 4 attempts .*Connection refused"
    with pytest.raises(RewardError, match=gone):
        scorer(PROMPTS, RESPONSES, SAMPLES)
    elapsed = time.perf_counter() - t0
    # Refused at once, 4 times, backoff 0.01 + 0.02 + 0.04 s (~0.1 s in all): waiting for even one
    # 60 s timeout would take longer than the bound, which leaves a loaded machine 200x.
    assert elapsed < 20, elapsed


def test_persistent_5xx_gives_up_after_the_retries(server):
    server.script = [fail(503, "down for maintenance")] * 3
    with pytest.raises(RewardError, match=r"after 3 attempts .*HTTP 503.*down for maintenance"):
        _scorer(server.url)(PROMPTS, RESPONSES, SAMPLES)
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "behaviour,message",
    [
        (reply([0.1, 0.2]), r"returned 2 rewards for 3 samples \(samples 0..2\)"),
        (reply([0.1, float("nan"), 0.3]), r"returned nan \(not finite\) on sample 1: prompt='q1' response='bb'"),
        (raw(b"[0.1, Infinity, 0.3]"), r"returned inf \(not finite\) on sample 1"),
        (reply([0.1, 0.2, "0.3"]), r"returned '0.3' \(not a number\) on sample 2: prompt='q2'"),
        (reply([0.1, True, 0.3]), r"returned True \(not a number\) on sample 1"),
        (raw(b"<html>Bad Gateway</html>"), r"reply is not JSON .*it starts '<html>Bad Gateway</html>'"),
        (reply({"scores": [1, 2, 3]}), r'expected a JSON list of 3 numbers or \{"rewards": \[...\]\}'),
        (fail(400, "missing field 'samples'"), r"HTTP 400 Bad Request: \"missing field 'samples'\""),
    ],
    ids=["wrong-length", "nan", "inf", "string", "bool", "not-json", "no-rewards-key", "http-400"],
)
def test_bad_replies_are_clear_errors_without_retry(server, behaviour, message):
    server.script = [behaviour]
    with pytest.raises(RewardError, match=rf"remote reward {re.escape(server.url)}.*{message}"):
        _scorer(server.url)(PROMPTS, RESPONSES, SAMPLES)
    assert len(server.requests) == 1  # the reply is wrong, not the connection: no retry


def test_config_selects_and_validates_the_endpoint(server):
    cfg = load_config(None, [f"reward.remote_url={server.url}", "reward.remote_max_retries=0"])
    scorer = make_scorer(cfg.reward)
    assert isinstance(scorer, RemoteRewardScorer) and scorer.max_retries == 0
    assert all(math.isclose(a, b) for a, b in zip(scorer(PROMPTS, RESPONSES, SAMPLES), EXPECTED))
    for override, key in [("reward.remote_url=localhost:8000", "reward.remote_url: must start with http://"),
                          ("reward.remote_timeout_s=0", "reward.remote_timeout_s"),
                          ("reward.remote_max_retries=-1", "reward.remote_max_retries"),
                          ("reward.remote_batch_size=0", "reward.remote_batch_size")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_a_dead_endpoint_is_found_before_the_run_starts(server):
    url = server.url
    server.stop()
    cfg = load_config(None, [f"reward.remote_url={url}", "reward.remote_max_retries=1", "reward.remote_timeout_s=60"])
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"remote reward {re.escape(url)}: cannot connect to 127\.0\.0\.1:\d+ "
                                          r"after 2 attempts .*Connection refused"):
        make_scorer(cfg.reward)
    # One 1 s backoff and two refused connects (~1 s): no 60 s request timeout was waited for.
    assert time.perf_counter() - t0 < 30
    assert server.requests == []


def test_the_start_up_check_sends_no_request(server):
    _scorer(server.url).check_reachable()
    assert server.requests == []


def test_the_start_up_check_connects_to_the_proxy_when_urllib_would(server, monkeypatch):
    from urllib.parse import urlsplit

    for var in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    dead = "http://reward.invalid:9/score"  # no such host: only the proxy can be reached
    with pytest.raises(RewardError, match="cannot connect to reward.invalid:9"):
        _scorer(dead, max_retries=0).check_reachable()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{urlsplit(server.url).port}")
    _scorer(dead, max_retries=0).check_reachable()  # the live server stands in for the proxy
    assert server.requests == []
