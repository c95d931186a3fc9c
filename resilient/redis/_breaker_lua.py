"""The breaker's Lua scripts: every read, transition and counter update is one of them.

KEYS[1] is the breaker's hash, KEYS[2] its probe leases (a sorted set: lease id ->
expiry); both carry the breaker's name as a hash tag, so they share a cluster slot.
ARGV[1..3] are the window size (0: none), the window duration (0: none) and the
hash's time to live in milliseconds; the rest are the operation's. Times are Redis
``TIME`` seconds. Every script answers ``{done, state, epoch, opened_at, consecutive,
window_calls, window_failures, probes_in_flight, probe_successes, now, foreign}`` with
floats as text (Lua would truncate a number to an integer on the way out); ``foreign``
is ``''``, or the window shape another breaker of the same name left in the hash, which
this script set aside for a window of its caller's shape.

Hash fields: ``st`` state, ``ep`` epoch, ``oa`` opened at, ``cf`` consecutive failures,
``ps`` probe successes, ``wc``/``wf`` window calls and failures, ``wk`` the window's
shape (``none``, ``window_size=N`` or ``window_duration=S``); a count window keeps
its ring of ``'0'``/``'1'`` in ``wr`` and its next position in ``wn``; a time window
keeps ten buckets ``c0..c9``/``f0..f9`` and the newest bucket's number in ``wb``.
"""

from __future__ import annotations

__all__ = ["ACQUIRE_PROBE", "COMPARE_AND_SET", "LOAD", "RECORD", "RELEASE_PROBE", "RENEW_PROBE"]

_PRELUDE = r"""
local H, P = KEYS[1], KEYS[2]
local wsize, wdur, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end

local s = {}
local raw = redis.call('HGETALL', H)
for i = 1, #raw, 2 do s[raw[i]] = raw[i + 1] end

-- The window's shape. A breaker of another shape under this name (a deploy that changed
-- window_size, or two breakers sharing a name by mistake) cannot read this window: it
-- starts one of its own shape, rather than misread the other's, and the reply says so.
local shape = 'none'
if wdur > 0 then shape = 'window_duration=' .. ARGV[2]
elseif wsize > 0 then shape = 'window_size=' .. ARGV[1] end
local foreign = ''
if s.wk ~= nil and s.wk ~= shape then
  foreign = s.wk
  s.wc, s.wf, s.wr, s.wn, s.wb = nil, nil, nil, nil, nil
end
local st = s.st or 'closed'
local ep = tonumber(s.ep or '0')
local cf = tonumber(s.cf or '0')
local ps = tonumber(s.ps or '0')
local wc = tonumber(s.wc or '0')
local wf = tonumber(s.wf or '0')
local dirty = false

-- A time window: drop the buckets that fell out of it by now (in memory only).
local width = wdur / 10
local buckets_c, buckets_f, wb = {}, {}, nil
if wdur > 0 then
  for i = 0, 9 do
    buckets_c[i] = tonumber(s['c' .. i] or '0')
    buckets_f[i] = tonumber(s['f' .. i] or '0')
  end
  wb = tonumber(s.wb or '')
  local bucket = math.floor(now / width)
  if wb == nil or bucket - wb >= 10 then
    for i = 0, 9 do buckets_c[i] = 0; buckets_f[i] = 0 end
    wc, wf, wb = 0, 0, bucket
  elseif bucket > wb then
    for b = wb + 1, bucket do
      local slot = b % 10
      wc = wc - buckets_c[slot]; wf = wf - buckets_f[slot]
      buckets_c[slot] = 0; buckets_f[slot] = 0
    end
    wb = bucket
  end
end

local ring, wn = nil, tonumber(s.wn or '0')
local function window_add(failed, times)
  if times <= 0 then return end
  dirty = true
  if wdur > 0 then
    local slot = wb % 10
    buckets_c[slot] = buckets_c[slot] + times
    wc = wc + times
    if failed then buckets_f[slot] = buckets_f[slot] + times; wf = wf + times end
  elseif wsize > 0 then
    if not failed and wf == 0 then
      -- Every stored outcome is a success: only the count grows (positions do not matter).
      wc = math.min(wsize, wc + times)
      return
    end
    if ring == nil then
      ring = {}
      local text = s.wr or ''
      for i = 1, wsize do ring[i] = (string.sub(text, i, i) == '1') and 1 or 0 end
    end
    local mark = failed and 1 or 0
    for _ = 1, math.min(times, wsize) do
      local at = wn + 1
      if wc >= wsize then wf = wf - ring[at] else wc = wc + 1 end
      ring[at] = mark
      wf = wf + mark
      wn = (wn + 1) % wsize
    end
  end
end

local function window_clear()
  wc, wf, wn, ring = 0, 0, 0, nil
  for i = 0, 9 do buckets_c[i] = 0; buckets_f[i] = 0 end
  redis.call('HDEL', H, 'wr')
end

local function save()
  if foreign ~= '' then
    -- The other shape's window goes: its fields would be misread by either shape.
    local gone = {'wr', 'wn', 'wb'}
    for i = 0, 9 do gone[#gone + 1] = 'c' .. i; gone[#gone + 1] = 'f' .. i end
    redis.call('HDEL', H, unpack(gone))
  end
  local fields = {'st', st, 'ep', ep, 'cf', cf, 'ps', ps, 'wc', wc, 'wf', wf, 'wk', shape}
  if s.oa then
    fields[#fields + 1] = 'oa'; fields[#fields + 1] = s.oa
  else
    redis.call('HDEL', H, 'oa')
  end
  if wdur > 0 then
    fields[#fields + 1] = 'wb'; fields[#fields + 1] = wb
    for i = 0, 9 do
      fields[#fields + 1] = 'c' .. i; fields[#fields + 1] = buckets_c[i]
      fields[#fields + 1] = 'f' .. i; fields[#fields + 1] = buckets_f[i]
    end
  elseif wsize > 0 then
    fields[#fields + 1] = 'wn'; fields[#fields + 1] = wn
    if ring ~= nil then
      local chars = {}
      for i = 1, wsize do chars[i] = ring[i] == 1 and '1' or '0' end
      fields[#fields + 1] = 'wr'; fields[#fields + 1] = table.concat(chars)
    end
  end
  redis.call('HSET', H, unpack(fields))
  if st == 'isolated' then
    redis.call('PERSIST', H)  -- isolate() holds until reset(): no expiry may end it
  else
    redis.call('PEXPIRE', H, ttl)
  end
end

local function reply(done)
  local probes = redis.call('ZCOUNT', P, '(' .. fmt(now), '+inf')
  return {done, st, ep, s.oa or '', cf, wc, wf, probes, ps, fmt(now), foreign}
end
"""

LOAD = (
    _PRELUDE
    + r"""
return reply(1)
"""
)

# ARGV[4] epoch, ARGV[5] new state, ARGV[6] reset_timeout (seconds).
COMPARE_AND_SET = (
    _PRELUDE
    + r"""
local epoch, new_state, reset_timeout = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
if epoch ~= ep then return reply(0) end
-- Open to half-open only once reset_timeout has passed by Redis's clock, whoever asks.
if new_state == 'half_open' and st == 'open' and s.oa and now < tonumber(s.oa) + reset_timeout then
  return reply(0)
end
ep = ep + 1
st = new_state
if new_state == 'open' or new_state == 'isolated' then s.oa = fmt(now) else s.oa = nil end
cf, ps = 0, 0
window_clear()
save()
return reply(1)
"""
)

# ARGV[4] the epoch the batched counts belong to, ARGV[5] batched successes,
# ARGV[6] batched failures, ARGV[7] this outcome: 1 failed, 0 succeeded, -1 none.
RECORD = (
    _PRELUDE
    + r"""
local epoch, successes, failures, outcome =
  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if st ~= 'closed' then return reply(0) end
if epoch == ep then
  if successes > 0 then cf = 0; window_add(false, successes) end
  if failures > 0 then cf = cf + failures; window_add(true, failures) end
end
if outcome == 1 then
  cf = cf + 1; window_add(true, 1)
elseif outcome == 0 then
  cf = 0; window_add(false, 1)
end
if dirty or outcome >= 0 then save() end
return reply(1)
"""
)

# ARGV[4] epoch, ARGV[5] limit, ARGV[6] lease id, ARGV[7] lease seconds.
ACQUIRE_PROBE = (
    _PRELUDE
    + r"""
local epoch, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, seconds = ARGV[6], tonumber(ARGV[7])
if st ~= 'half_open' or epoch ~= ep then return reply(0) end
-- A lease whose probe died (its process, say) frees its slot when it expires.
redis.call('ZREMRANGEBYSCORE', P, '-inf', fmt(now))
if redis.call('ZCARD', P) >= limit then return reply(0) end
redis.call('ZADD', P, fmt(now + seconds), lease)
redis.call('PEXPIRE', P, math.ceil(seconds * 1000) + 1000)
return reply(1)
"""
)

# ARGV[4] epoch, ARGV[5] 1 if the probe succeeded, ARGV[6] lease id.
RELEASE_PROBE = (
    _PRELUDE
    + r"""
local epoch, succeeded, lease = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6]
redis.call('ZREM', P, lease)
if epoch ~= ep then return reply(0) end
if succeeded then ps = ps + 1; save() end
return reply(1)
"""
)

# ARGV[4] lease id, ARGV[5] lease seconds. Answers 1 if the lease was still held (its
# expiry is now moved on), 0 if it had expired or was given back. No prelude: it reads
# nothing else.
RENEW_PROBE = r"""
local P = KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease, seconds = ARGV[4], tonumber(ARGV[5])
local expiry = tonumber(redis.call('ZSCORE', P, lease) or '')
if expiry == nil or expiry <= now then return 0 end
redis.call('ZADD', P, string.format('%.17g', now + seconds), lease)
redis.call('PEXPIRE', P, math.ceil(seconds * 1000) + 1000)
return 1
"""
