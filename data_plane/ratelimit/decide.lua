-- Every limit of one request, decided atomically on Redis server time.
--
-- KEYS (all carry the tenant's hash tag, so they live in one slot of a Redis Cluster):
--   1 tenant per-minute window   2 tenant per-hour window   3 route per-tenant window
--   4 route token bucket         5 monthly quota            6 concurrency leases (zset)
-- ARGV:
--   1 per-minute limit  2 per-hour limit  3 route limit per minute  4 route burst
--   5 monthly quota     6 max concurrency  (each 0: no such limit)
--   7 lease id  8 lease ttl ms  9 length of a "minute" in ms (60000 outside tests)
--   10 now in ms, 0 for Redis TIME (tests pass a fixed clock)
-- Returns {allowed (1/0), rejecting kind, retry ms,
--          minute remaining, minute reset ms, hour remaining, hour reset ms,
--          route remaining, route reset ms, burst remaining, burst reset ms,
--          quota remaining, quota reset ms}
-- Kinds: 0 none, 1 minute, 2 hour, 3 route, 4 burst, 5 quota, 6 concurrency.
--
-- Nothing is consumed unless every check passes. Windows are sliding windows of N+1
-- sub-buckets with a running sum ("s") and the oldest non-empty bucket ("o"): a request at
-- bucket k counts buckets k-N..k, a span of at least N buckets (the window) and at most
-- N+1, so no window of the nominal length ever holds more than the limit.

local N = 120

local now = tonumber(ARGV[10])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local minute_ms = tonumber(ARGV[9])

local function open_window(key, bucket)
  local k = math.floor(now / bucket)
  local lo = k - N
  local f = string.format('%d', k)
  local v = redis.call('HMGET', key, 's', 'o', f)
  local s = tonumber(v[1]) or 0
  local o = tonumber(v[2])
  if s <= 0 or o == nil or o < lo - N then
    -- Empty, or untouched for longer than a window: every bucket has expired.
    if v[1] then redis.call('DEL', key) end
    return {key = key, bucket = bucket, k = k, f = f, c = 0, s = 0, o = k, fresh = true, dirty = false}
  end
  local dirty = false
  if o < lo then
    -- Drop the expired buckets, then move "o" on to the oldest bucket still counted. (While
    -- "o" is within the window it is a bucket with a count: nothing to read.)
    dirty = true
    while o < k do
      local fo = string.format('%d', o)
      local c = redis.call('HGET', key, fo)
      if o < lo then
        if c then
          s = s - tonumber(c)
          redis.call('HDEL', key, fo)
        end
        o = o + 1
      elseif c then
        break
      else
        o = o + 1
      end
    end
    if s <= 0 then
      redis.call('DEL', key)
      return {key = key, bucket = bucket, k = k, f = f, c = 0, s = 0, o = k, fresh = true, dirty = false}
    end
  end
  local c = tonumber(v[3]) or 0
  return {key = key, bucket = bucket, k = k, f = f, c = c, s = s, o = o, fresh = false, dirty = dirty}
end

-- When enough of the window has expired for `need` more requests to fit.
local function window_retry(w, need)
  local acc = 0
  local j = w.o
  while j <= w.k do
    local c = redis.call('HGET', w.key, string.format('%d', j))
    if c then
      acc = acc + tonumber(c)
      if acc >= need then break end
    end
    j = j + 1
  end
  return math.ceil((j + N + 1) * w.bucket - now)
end

-- Count the request: the current bucket, the sum and the oldest bucket in one write. The key
-- must outlive its newest bucket's stay in the window: an expiry set at the first request of
-- each bucket (now + window + 2 buckets) covers every later request of that bucket.
local function window_commit(w, window_ms)
  redis.call('HSET', w.key, w.f, w.c + 1, 's', w.s + 1, 'o', string.format('%d', w.o))
  if w.c == 0 then
    redis.call('PEXPIRE', w.key, math.ceil(window_ms + 2 * w.bucket))
  end
end

-- A refused request counts nothing, but expired buckets it dropped must leave the sum.
local function window_keep(w)
  if w.dirty then
    redis.call('HSET', w.key, 's', w.s, 'o', string.format('%d', w.o))
  end
end

-- Civil date from days since 1970-01-01 and back (proleptic Gregorian, UTC).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function month_of(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  if m <= 2 then y = y + 1 end
  return y, m
end

local limits = {}
for i = 1, 6 do limits[i] = tonumber(ARGV[i]) end

local allowed = true
local kind = 0
local retry = 0
local rate_retry = 0
local out = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

local function reject(k, ms)
  allowed = false
  if k ~= 6 and ms > rate_retry then
    rate_retry = ms
    if kind ~= 5 then kind = k end
  end
  if k == 5 then kind = 5 end
  if k == 6 and kind == 0 then kind = 6 end
  if ms > retry then retry = ms end
end

-- Sliding windows: tenant per minute, tenant per hour, route per minute.
local windows = {}
local spans = {minute_ms, 60 * minute_ms, minute_ms}
for i = 1, 3 do
  local limit = limits[i]
  if limit > 0 then
    local w = open_window(KEYS[i], spans[i] / N)
    windows[i] = w
    if w.s + 1 > limit then
      reject(i, window_retry(w, w.s + 1 - limit))
    end
  end
end

-- Token bucket on the route: `burst` tokens, refilled at the route limit per minute.
local bucket_tokens
local burst = limits[4]
local rate = limits[3] / minute_ms
if burst > 0 and rate > 0 then
  local v = redis.call('HMGET', KEYS[4], 't', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  end
  bucket_tokens = tokens
  if tokens < 1 then reject(4, math.ceil((1 - tokens) / rate)) end
end

-- Monthly quota, calendar month in UTC.
local quota = limits[5]
local quota_used, period, month_end
if quota > 0 then
  local y, m = month_of(math.floor(now / 86400000))
  period = y * 12 + m - 1
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  month_end = days_from_civil(ny, nm, 1) * 86400000
  local v = redis.call('HMGET', KEYS[5], 'p', 'n')
  quota_used = 0
  if tonumber(v[1]) == period then quota_used = tonumber(v[2]) or 0 end
  if quota_used + 1 > quota then reject(5, month_end - now) end
end

-- Concurrency: one lease per request in flight, expiring unless its node renews it.
local max_conc = limits[6]
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
  if redis.call('ZCARD', KEYS[6]) >= max_conc then reject(6, 1000) end
end

if not allowed then
  for i = 1, 3 do
    if windows[i] then window_keep(windows[i]) end
  end
end

if allowed then
  for i = 1, 3 do
    if windows[i] then window_commit(windows[i], spans[i]) end
  end
  if bucket_tokens then
    bucket_tokens = bucket_tokens - 1
    redis.call('HSET', KEYS[4], 't', string.format('%.6f', bucket_tokens), 'ts', now)
    redis.call('PEXPIRE', KEYS[4], math.ceil(burst / rate) + 1000)
  end
  if quota > 0 then
    if quota_used == 0 then
      -- A new month: the key lives until a day after it ends (set once; the end does not move).
      redis.call('HSET', KEYS[5], 'p', period, 'n', 1)
      redis.call('PEXPIRE', KEYS[5], month_end - now + 86400000)
    else
      redis.call('HINCRBY', KEYS[5], 'n', 1)
    end
    quota_used = quota_used + 1
  end
  if max_conc > 0 then
    local ttl = tonumber(ARGV[8])
    redis.call('ZADD', KEYS[6], now + ttl, ARGV[7])
    redis.call('PEXPIRE', KEYS[6], 2 * ttl)
  end
end

out[1] = allowed and 1 or 0
out[2] = kind
out[3] = retry
for i = 1, 3 do
  local w = windows[i]
  if w then
    local s = w.s
    local o = w.o
    if allowed then
      s = s + 1
    end
    out[2 + 2 * i] = math.max(0, limits[i] - s)
    if s > 0 then
      out[3 + 2 * i] = math.ceil((o + N + 1) * w.bucket - now)
    end
  end
end
if bucket_tokens then
  out[10] = math.max(0, math.floor(bucket_tokens))
  out[11] = math.ceil((burst - bucket_tokens) / rate)
end
if quota > 0 then
  out[12] = math.max(0, quota - quota_used)
  out[13] = month_end - now
end
return out
