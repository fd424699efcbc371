"""The services tasks call (a payment processor, a mail server): one rate limit and one
circuit breaker per dependency, shared by every worker process on every host.

Celery's own ``rate_limit`` is a token bucket per worker process: four workers of 32
threads send four times the rate, and an autoscaler that adds workers when the queue
grows multiplies it again, just when the processor is busiest. Here the state lives in
Redis (the broker's, or JOBS_DEPENDENCY_REDIS_URL), read and changed by small Lua
scripts, each atomic and one round trip, timed by Redis's own clock (hosts' clocks may
disagree; the server's is one):

- The rate limit is a schedule (GCRA, the "virtual scheduling" form of a leaky bucket):
  Redis keeps the time the next call may start; a caller takes that slot and moves it on
  by 1/rate, then sleeps until its slot. Calls start evenly spaced, and a waiting caller
  knows exactly when its turn comes with one round trip.
  (Why not a library: `limits` (moving and sliding windows, the strategies of
  Flask-Limiter) and `pyrate-limiter` answer "now or not" and leave waiting to the
  caller, who can only sleep and ask again; 128 threads waiting for 50 slots a second ask
  thousands of times a second, every one a Lua script on the broker's Redis. A slot
  booked in one call costs one round trip for a call that goes at once, two for one
  that waits, whatever the contention.)
- A caller whose slot is further away than it may wait (JOBS_DEPENDENCY_MAX_WAIT, and
  never past half its run's deadline) keeps that slot and raises Deferred: the task is
  scheduled again for a little before it, carrying the booking, without spending a
  retry. Beyond the horizon (the retry policy's cap) nothing is booked.
- Spacing alone does not hold the limit where the service counts it: a process stalled
  after its turn (CPU throttled, starved of the GIL) sends its late calls together with
  the on-time calls of others, and a clock second at the service gets more than
  ``rate``. So each call, just before it goes, also counts itself in the current clock
  second (Redis's): one that finds the second full (``ceil(rate)`` sends) gives its turn
  up and books another. The count is part of the booking for a call that goes at once,
  and of the breaker's check after the wait for one that waited. It bounds what leaves
  in each of Redis's seconds; a stall after the count, or the service's clock, can still
  put a call in the service's next second, so set the rate a little below its limit
  (the lab and the bench use 0.95 of it).
- A ``429 Too Many Requests`` moves the schedule past its ``Retry-After`` for every
  caller (``throttled``), and the task is deferred, not failed: a limit is not an outage.
- An operator's call (``operator_call()``: a discard that asks the gateway, a cancel
  from the admin) books no turn: it goes in the current clock second if the second has
  a send left. Behind the tasks' booked turns it would be refused for as long as a
  backlog drains at the limit, which is when operators act.
- The circuit breaker counts failures in a row (what the caller says is one: a refused
  connection, a timeout, a 5xx; never a decline or a 429). At ``failures`` it opens:
  every task for the dependency is deferred to the end of the cooldown, sending nothing.
  Then one caller, the probe, may call (``half_open``; the others are deferred); its
  success closes the breaker, its failure opens it for another cooldown. After closing,
  the rate climbs from a tenth of the limit to all of it over ``ramp`` seconds, so a
  processor back from an incident is not hit by the whole backlog at once.

When Redis cannot be reached the call goes ahead (fail open): the processor's own limit
still answers 429, and a broker outage must not stop charges that are already running.

Configure per dependency (the host's names: ``JOBS_DEPENDENCIES = {"gateway": {"rate":
50}}``): ``rate`` (calls per second for all workers together; None: no limit),
``failures`` (5), ``cooldown`` (30 s), ``ramp`` (30 s), ``probe_timeout`` (the longest a
probe may take before another caller may probe, 60 s).
"""

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

import redis

from jobs import deadline
from jobs.conf import jobs_settings
from jobs.errors import TransientError

logger = logging.getLogger(__name__)

# Every script starts with Redis's clock (TIME: one clock for all hosts) and these two.
# count_send counts a send in this clock second (KEYS[3] holds "second:count"): nil when
# counted, or, when the second already has its ``cap`` sends, the seconds to the next.
_PRELUDE = """
local function fmt(x) return string.format('%.6f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function count_send(cap)
  local second = tonumber(t[1])
  local n = 1
  local sent = redis.call('GET', KEYS[3])
  if sent then
    local at, count = string.match(sent, '(%d+):(%d+)')
    if tonumber(at) == second then n = tonumber(count) + 1 end
  end
  if n > cap then return second + 1 - now end
  redis.call('SET', KEYS[3], second .. ':' .. n, 'EX', 2)
  return nil
end
"""

# KEYS: the breaker's hash, the schedule's key, this second's sends ("second:count").
# ARGV: rate (0: none), max wait, ramp, probe timeout, horizon, the slot this caller
# booked earlier (0: none), 1 for an operator's call (no turn: this second's count only,
# after a 429's pause). Returns
# {verdict, seconds[, slot]}: go (after seconds, then _SEND; or 'now' follows: counted),
# probe (go now, the breaker's probe),
# booked (a slot further than max wait, booked: come back then), busy (further than the
# horizon: nothing booked), open / half_open (seconds until the cooldown or the probe
# ends). Times are kept as fixed-point text: Lua's tostring keeps 14 digits, a tenth of
# a millisecond of today's epoch, too coarse for a slot every 1/rate s.
_ADMIT = (
    _PRELUDE
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'until', 'closed_at', 'resume')
local state = b[1] or 'closed'
local max_wait = tonumber(ARGV[2])
local rate = tonumber(ARGV[1])
local reserved = tonumber(ARGV[6])
local cap = math.ceil(rate)  -- sends in any clock second (the full rate, not the ramp's)
if state == 'open' or state == 'half_open' then
  local until_ = tonumber(b[2]) or 0
  if now < until_ then return {state, fmt(until_ - now)} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'until', fmt(now + tonumber(ARGV[4])))
  if cap > 0 then count_send(cap) end  -- counted; it goes whatever the count says
  return {'probe', '0'}
end
-- A call that goes now counts itself in this clock second's sends; a full second sends
-- it to the next one (where the caller counts itself, _SEND), unless that is further
-- than it may wait.
local function go(wait)
  if wait > 0 then return {'go', fmt(wait)} end
  local wait_for_next = cap > 0 and count_send(cap)
  if wait_for_next and wait_for_next > max_wait then return {'busy', fmt(wait_for_next)} end
  if wait_for_next then return {'go', fmt(wait_for_next)} end
  return {'go', '0', 'now'}
end
-- An operator's call takes no turn in the schedule (the tasks' backlog may have booked
-- every turn up to the horizon): it goes in this clock second if the second has a send
-- left, which the per-second count keeps within the limit.
if ARGV[7] == '1' then
  local resume = tonumber(b[4]) or 0
  if now < resume then  -- a 429's pause: the service asked everyone to wait
    if resume - now > max_wait then return {'busy', fmt(resume - now)} end
    return {'go', fmt(resume - now)}
  end
  return go(0)
end
-- Booked on an earlier run of this task: its turn, no new booking (late or not: the
-- count of its second says whether it may go now). Not if a 429 came since (a pause
-- until 'resume'): it books anew, behind the pause.
if reserved > 0 and reserved >= (tonumber(b[4]) or 0) then
  local wait = math.max(0, reserved - now)
  if wait > max_wait then return {'booked', fmt(wait), fmt(reserved)} end
  return go(wait)
end
-- The schedule: when the next call may start (also pushed past a 429's Retry-After).
local slot = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0'))
local wait = slot - now
if wait > tonumber(ARGV[5]) then return {'busy', fmt(wait)} end
if rate > 0 then
  local closed_at = tonumber(b[3])
  local ramp = tonumber(ARGV[3])
  if closed_at and ramp > 0 and now < closed_at + ramp then
    rate = rate * math.max(0.1, (now - closed_at) / ramp)
  end
  local interval = 1 / rate
  local ttl = math.ceil((wait + interval) * 1000) + 1000
  redis.call('SET', KEYS[2], fmt(slot + interval), 'PX', ttl)
end
if wait > max_wait then return {'booked', fmt(wait), fmt(slot)} end
return go(wait)
"""
)

# KEYS: the breaker's hash, the schedule's key. ARGV: outcome (ok | fail | throttled),
# failures to open, cooldown, Retry-After. Returns the transition: opened, closed or ''.
# A 429 pushes the schedule past its Retry-After, and counts as an answer: a probe
# answered 429 closes the breaker (the service is up; the schedule holds the callers).
_OUTCOME = (
    _PRELUDE
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'failures')
local state = b[1] or 'closed'
if ARGV[1] == 'throttled' then
  local resume = now + tonumber(ARGV[4])
  -- Callers holding a turn already (booked, or waiting for it) see the pause in 'resume'.
  if resume > (tonumber(redis.call('HGET', KEYS[1], 'resume')) or 0) then
    redis.call('HSET', KEYS[1], 'resume', fmt(resume))
  end
  local slot = tonumber(redis.call('GET', KEYS[2]) or '0')
  if resume > slot then
    local ttl = math.ceil(tonumber(ARGV[4]) * 1000) + 1000
    redis.call('SET', KEYS[2], fmt(resume), 'PX', ttl)
  end
end
if ARGV[1] ~= 'fail' then  -- an answer (a 429 too): the service is up
  if state == 'half_open' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', '0', 'closed_at', fmt(now))
    return 'closed'
  end
  if state == 'closed' and b[2] and b[2] ~= '0' then
    redis.call('HSET', KEYS[1], 'failures', '0')
  end
  return ''
end
if state == 'open' then return '' end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half_open' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', fmt(now + tonumber(ARGV[3])),
    'opened_at', fmt(now))
  return 'opened'
end
return ''
"""
)


# KEYS: the breaker's hash. A half open breaker's probe is over: the next caller probes.
_INCONCLUSIVE = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  redis.call('HSET', KEYS[1], 'until', fmt(now))
end
return ''
"""
)


# KEYS: the breaker's hash, the schedule's key, this second's sends. ARGV: rate (0:
# none). A call about to go after its wait: it counts itself in this clock second, or
# says why it may not go: the breaker opened or a probe went out meanwhile (open /
# half_open, seconds until the cooldown or the probe ends), or not now (full: the
# second already has its ceil(rate) sends, calls that woke late from a stalled process;
# or a 429's pause began meanwhile).
_SEND = (
    _PRELUDE
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'until', 'resume')
if b[1] == 'open' or b[1] == 'half_open' then
  return {b[1], fmt(math.max(0, (tonumber(b[2]) or 0) - now))}
end
local resume = tonumber(b[3]) or 0
if now < resume then return {'full', fmt(resume - now)} end  -- a 429 came meanwhile
local cap = math.ceil(tonumber(ARGV[1]))
if cap == 0 then return {'go', '0'} end
local wait_for_next = count_send(cap)
if wait_for_next then return {'full', fmt(wait_for_next)} end
return {'go', '0'}
"""
)


class Deferred(TransientError):
    """The call was not made (its turn is too far off, the breaker is open, the service
    said 429): run the task again in ``delay`` seconds, without spending a retry
    (ReliableTask does). Outside a task it reads as the service being unavailable."""

    def __init__(
        self, dependency: str, reason: str, delay: float, slot: float | None = None
    ) -> None:
        super().__init__(f"{dependency}: {reason}, not called; again in {delay:.1f} s")
        self.dependency = dependency
        self.reason = reason  # rate_limited | throttled | breaker_open
        self.delay = delay
        self.slot = slot  # the slot booked for the next run (Redis's clock), if any

    def explain(self) -> str:
        why = {
            "breaker_open": "its circuit breaker is open after failures",
            "rate_limited": "the rate limit set for it is reached",
            "throttled": "it asked to be called less often",
        }.get(self.reason, self.reason)
        return f"the {self.dependency} is not called for now ({why}; about {self.delay:.0f} s)"

    def __reduce__(self) -> tuple[type["Deferred"], tuple[str, str, float, float | None]]:
        # Picklable as itself: Celery keeps only what pickles of a Retry's exception.
        return type(self), (self.dependency, self.reason, self.delay, self.slot)


@dataclass(frozen=True)
class Limits:
    """One dependency's settings (JOBS_DEPENDENCIES[name], the rest defaults)."""

    rate: float | None = None
    failures: int = 5
    cooldown: float = 30.0
    ramp: float = 30.0
    probe_timeout: float = 60.0

    @classmethod
    def of(cls, name: str) -> "Limits":
        configured: dict[str, Any] = dict(jobs_settings.DEPENDENCIES.get(name, {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(configured) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        for key, value in configured.items():
            # Redis would refuse a None or a text as a script argument, and the call
            # would then go ahead unlimited, as if Redis were down.
            if (value is None and key != "rate") or (
                value is not None
                and (isinstance(value, bool) or not isinstance(value, int | float))
            ):
                raise TypeError(f"{key} is {value!r}: give a number")
        return cls(**configured)


_clients: dict[str, redis.Redis] = {}


def _redis() -> redis.Redis | None:
    url = jobs_settings.DEPENDENCY_REDIS_URL
    if not url:
        from jobs.broker import redis_client

        return redis_client()
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    return _clients[url]


class Dependency:
    """A service the tasks call. ``admit()`` before each call (it waits for the call's
    turn, or raises Deferred); then exactly one of ``succeeded()`` (an answer, whatever
    it says: a decline, a 4xx), ``failed()`` (a failure the breaker counts),
    ``throttled(retry_after)`` (a 429: returns the Deferred to raise) or
    ``inconclusive()`` (nothing that speaks for the service's health: no call made after
    all, a read while the writes are what fail)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._keys = [f"jobs:breaker:{name}", f"jobs:schedule:{name}", f"jobs:sent:{name}"]

    def admit(self) -> None:
        limits = Limits.of(self.name)
        while not self._admitted(limits):
            pass  # its second was full when it woke: book another turn

    def _admitted(self, limits: Limits) -> bool:
        """One booking: True when the call may go now, False when it woke to a clock
        second that already had its sends (nothing sent, the turn given up); raises
        Deferred."""
        left = deadline.remaining()
        max_wait = jobs_settings.DEPENDENCY_MAX_WAIT
        if left is not None:
            max_wait = max(0.0, min(max_wait, left / 2))
        horizon = jobs_settings.RETRY_BACKOFF_CAP  # a deferral never waits longer
        booked = reserved_slots()
        reserved = booked.pop(self.name, 0.0)  # used once: a second call books its own
        _slots.set(booked)
        rate = limits.rate or 0
        operator = 1 if _operator.get() else 0
        answer = self._script(
            _ADMIT, rate, max_wait, limits.ramp, limits.probe_timeout, horizon, reserved, operator
        )
        if answer is None:
            return True
        verdict, seconds = answer[0].decode(), float(answer[1])
        if verdict == "go":
            if len(answer) > 2:  # now (counted in this second's sends)
                return True
            if seconds > 0:
                _sleep(seconds)
            return self._sending(limits)
        if verdict == "probe":
            logger.info("%s: circuit breaker half open, this call is the probe", self.name)
            return True
        if verdict == "booked":
            # Back a little before the slot booked for it (half the max wait early, to
            # sleep the rest): a worker busy when the countdown ends starts it late.
            back = max(seconds - max_wait / 2, seconds / 2)
            raise Deferred(self.name, "rate_limited", back, slot=float(answer[2]))
        if verdict == "busy":  # further off than any deferral waits: nothing booked
            raise Deferred(self.name, "rate_limited", seconds)
        raise Deferred(self.name, "breaker_open", self._breaker_delay(verdict, seconds, limits))

    def _breaker_delay(self, verdict: str, seconds: float, limits: Limits) -> float:
        """When to come back while the breaker is not closed: after the probe (soon) or
        the cooldown, spread over one cooldown at first and twice as long with each
        deferral in a row, up to four cooldowns (and the horizon): a backlog held by a
        long outage comes back a fraction of it each cooldown, and all of it within four
        cooldowns of the recovery."""
        if verdict == "half_open":  # a probe is out: it may close the breaker soon
            return _spread(1.0, max(1.0, limits.cooldown / 4))
        spread = limits.cooldown * min(2.0 ** _deferrals.get(), 4.0)
        return min(seconds + _spread(0, spread), jobs_settings.RETRY_BACKOFF_CAP)

    def _sending(self, limits: Limits) -> bool:
        """After the wait, just before the call: True when it counted itself in this
        clock second, False when the second was full (a call that woke late: the turn is
        given up); raises Deferred when the breaker opened or a probe went out meanwhile."""
        answer = self._script(_SEND, limits.rate or 0)
        if answer is None:
            return True
        verdict, seconds = answer[0].decode(), float(answer[1])
        if verdict == "go":
            return True
        if verdict == "full":
            logger.info(
                "%s: not now (this second is full, or a 429's pause): another turn", self.name
            )
            return False
        raise Deferred(self.name, "breaker_open", self._breaker_delay(verdict, seconds, limits))

    def inconclusive(self) -> None:
        """An answer that says nothing about what the breaker guards (a read while the
        writes are what fail): no outcome; a probe that got it hands the probe on."""
        self._script(_INCONCLUSIVE)

    def succeeded(self) -> None:
        if self._outcome("ok") == "closed":
            logger.warning("%s: circuit breaker closed, the probe succeeded", self.name)

    def failed(self) -> None:
        if self._outcome("fail") == "opened":
            limits = Limits.of(self.name)
            logger.warning(
                "%s: circuit breaker open for %g s: calls are deferred, not made",
                self.name,
                limits.cooldown,
            )

    def throttled(self, retry_after: float) -> Deferred:
        """The service answered 429: every caller waits ``retry_after``; returns the
        Deferred for the caller to raise."""
        self._outcome("throttled", retry_after)
        return Deferred(self.name, "throttled", retry_after * _spread(1.0, 1.5))

    def state(self) -> dict[str, Any]:
        """The breaker as Redis holds it (for /metrics and the Operations page); raises
        redis.RedisError."""
        client = _redis()
        raw: dict[bytes, bytes] = client.hgetall(self._keys[0]) if client is not None else {}  # type: ignore[assignment]
        values = {k.decode(): v.decode() for k, v in raw.items()}
        state = values.get("state", "closed")
        return {
            "state": state,
            "failures": int(values.get("failures", 0)),
            # open: the end of the cooldown; half open: the probe's deadline
            "until": float(values["until"]) if state != "closed" else None,
        }

    def _outcome(self, outcome: str, retry_after: float = 0.0) -> str:
        limits = Limits.of(self.name)
        answer = self._script(_OUTCOME, outcome, limits.failures, limits.cooldown, retry_after)
        return answer.decode() if isinstance(answer, bytes) else ""

    def _script(self, source: str, *args: Any) -> Any:
        client = _redis()
        if client is None:
            return None
        script = _scripts.get((id(client), source))
        if script is None:
            script = _scripts[(id(client), source)] = client.register_script(source)
        try:
            return script(keys=self._keys, args=args)
        except redis.RedisError as exc:
            logger.warning("%s: no shared limit or breaker, calling anyway: %r", self.name, exc)
            return None


_scripts: dict[tuple[int, str], Any] = {}

# What the run in progress carries from its earlier deferrals (ReliableTask sets them
# from the message's headers): the slots booked for it, and how many deferrals in a row.
_slots: ContextVar[dict[str, float]] = ContextVar("jobs_dependency_slots", default={})  # noqa: B039
_deferrals: ContextVar[int] = ContextVar("jobs_dependency_deferrals", default=0)
SLOTS_HEADER, DEFERRALS_HEADER = "x_jobs_slots", "x_jobs_deferrals"


def reserved_slots() -> dict[str, float]:
    return dict(_slots.get())


_operator: ContextVar[bool] = ContextVar("jobs_dependency_operator", default=False)


@contextmanager
def operator_call() -> Iterator[None]:
    """Calls made in this block are an operator's (a discard asking the gateway, an
    order cancelled from the admin): rare, and a person waits for each. They do not
    queue behind the turns the tasks booked (a backlog draining at the limit books every
    turn up to the horizon, and the operator would be refused until it drained); each
    goes in the current clock second if that second has a send left, so the limit holds
    where the service counts it. The breaker and a 429's pause still hold them back."""
    token = _operator.set(True)
    try:
        yield
    finally:
        _operator.reset(token)


@contextmanager
def carried(slots: dict[str, float], deferrals: int) -> Iterator[None]:
    """The run in progress holds these booked slots and follows this many deferrals."""
    tokens = _slots.set(dict(slots)), _deferrals.set(deferrals)
    try:
        yield
    finally:
        _slots.reset(tokens[0])
        _deferrals.reset(tokens[1])


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _spread(low: float, high: float) -> float:
    return random.uniform(low, high)  # noqa: S311 (jitter, not secrets)
