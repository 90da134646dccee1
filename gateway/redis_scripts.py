"""Lua scripts that make each shared-state step one atomic Redis command.

They mirror ``gateway.limits`` (buckets), keep the upstreams' shared 429 hold and run the
lease protocol of ``gateway.state.TaskStore``; floats travel as ``%.17g`` strings so
nothing is rounded to an integer on the way back. Keys outside ``KEYS`` are derived from a
prefix in ``ARGV`` (a single Redis, not a cluster).
"""

from __future__ import annotations

# KEYS[1] user hash. ARGV: now, rpm (-1: none), capacity, tokens_per_day (-1), tokens, ttl_ms
USER_ADMIT = """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local tpd = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'r', 't', 'last')
local r = tonumber(h[1])
local t = tonumber(h[2])
local last = tonumber(h[3])
if last == nil then
  r = cap
  if tpd >= 0 then t = tpd else t = 0 end
  last = now
end
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
if now > last then last = now end
local rw = 0
local tw = 0
if rpm >= 0 then
  r = math.min(cap, r + elapsed * rpm / 60.0)
  if r < 1.0 then rw = (1.0 - r) / (rpm / 60.0) end
end
local fmt = '%.17g'
if tpd >= 0 then
  t = math.min(tpd, t + elapsed * tpd / 86400.0)
  if tokens > tpd then
    redis.call('HSET', KEYS[1], 'r', string.format(fmt, r), 't', string.format(fmt, t),
               'last', string.format(fmt, last))
    return {0, 'request_larger_than_tokens_per_day', '86400'}
  end
  if t < tokens then tw = (tokens - t) / (tpd / 86400.0) end
end
local result
if rw > 0 or tw > 0 then
  local limit = 'tokens_per_day'
  if rw >= tw then limit = 'requests_per_minute' end
  result = {0, limit, string.format(fmt, math.max(rw, tw))}
else
  if rpm >= 0 then r = r - 1.0 end
  if tpd >= 0 then t = t - tokens end
  result = {1, '', '0'}
end
redis.call('HSET', KEYS[1], 'r', string.format(fmt, r), 't', string.format(fmt, t),
           'last', string.format(fmt, last))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return result
"""

# KEYS[1] hold. ARGV: until (virtual seconds). A later hold extends it, an earlier one is moot.
PROVIDER_HOLD = """
local held = tonumber(ARGV[1])
if held > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%.17g', held))
end
return 1
"""

# KEYS[1] task hash, KEYS[2] queue list. ARGV: id, spec, now
ENQUEUE = """
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'state', 'queued', 'attempts', 0, 'misses', 0,
           'updated', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1] leases zset. ARGV: prefix, now, lease_until, batch_max, queue names...
# First re-queues tasks whose lease expired (their worker died), then leases the next.
CLAIM = """
local prefix = ARGV[1]
local now = ARGV[2]
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  local k = prefix .. 'task:' .. id
  if redis.call('HGET', k, 'state') == 'running' then
    redis.call('HSET', k, 'state', 'queued')
    local spec = cjson.decode(redis.call('HGET', k, 'spec'))
    redis.call('LPUSH', prefix .. 'q:' .. spec['queue'], id)
  end
end
local out = {}
for i = 5, #ARGV do
  local q = prefix .. 'q:' .. ARGV[i]
  local n = 1
  if ARGV[i] == 'batch' then n = tonumber(ARGV[4]) end
  while #out < n * 3 do
    local id = redis.call('LPOP', q)
    if not id then break end
    local k = prefix .. 'task:' .. id
    if redis.call('HGET', k, 'state') == 'queued' then
      local attempts = redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('HSET', k, 'state', 'running', 'updated', now)
      redis.call('ZADD', KEYS[1], ARGV[3], id)
      local h = redis.call('HMGET', k, 'spec', 'misses')
      table.insert(out, id)
      table.insert(out, h[1])
      table.insert(out, tostring(attempts) .. ':' .. (h[2] or '0'))
    end
  end
  if #out > 0 then return out end
end
return out
"""

# KEYS[1] task hash, KEYS[2] leases. ARGV: id, state, result, error, status, misses, now
FINISH = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s or s == 'done' or s == 'failed' or s == 'dead_lettered' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'result', ARGV[3], 'error', ARGV[4],
           'status', ARGV[5], 'misses', ARGV[6], 'updated', ARGV[7])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1] task hash, KEYS[2] leases, KEYS[3] queue. ARGV: id, misses, now
REQUEUE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'misses', ARGV[2], 'updated', ARGV[3],
           'attempts', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[5] == '1' then
  redis.call('RPUSH', KEYS[3], ARGV[1])
else
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
return 1
"""
