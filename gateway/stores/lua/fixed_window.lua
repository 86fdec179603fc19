-- fixed_window: a counter that starts with the first request and ends `window` later.
-- The twin of gateway/stores/algorithms.py:fixed_window_check. State: KEYS[k] = count (PX).
ALGORITHMS["fixed_window"] = {
  check = function(keys, limit, window, burst, cost, now)
    local count = tonumber(redis.call("GET", keys[1]) or "0")
    local ttl = redis.call("PTTL", keys[1])
    if count == 0 or ttl < 0 then
      count = 0
      ttl = window
    end
    local allowed = count + cost <= limit
    local used = count
    if allowed then used = count + cost end
    local retry = 0
    if not allowed then retry = ttl end
    return allowed, math.max(limit - used, 0), ttl, retry, {count, ttl}
  end,
  commit = function(keys, limit, window, burst, cost, now, state)
    if state[1] == 0 then
      redis.call("SET", keys[1], cost, "PX", window)
    else
      redis.call("INCRBY", keys[1], cost)
    end
  end,
}
