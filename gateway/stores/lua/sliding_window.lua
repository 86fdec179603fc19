-- sliding_window: this window's count plus the previous window's, weighted by its overlap.
-- The twin of gateway/stores/algorithms.py:sliding_window_check.
-- State: KEYS[1] = this window's count, KEYS[2] = the previous window's (each PX 2 windows).
ALGORITHMS["sliding_window"] = {
  check = function(keys, limit, window, burst, cost, now)
    local current = tonumber(redis.call("GET", keys[1]) or "0")
    local previous = tonumber(redis.call("GET", keys[2]) or "0")
    local elapsed = now % window
    local estimate = previous * ((window - elapsed) / window) + current
    local allowed = estimate + cost <= limit
    local used = estimate
    if allowed then used = estimate + cost end
    local retry = 0
    if not allowed then
      local room = limit - cost
      if current <= room and previous > 0 then
        retry = math.max(math.ceil((window - elapsed) - room * window / previous + current * window / previous), 1)
      elseif current == 0 then
        retry = window - elapsed
      else
        local into_next = 0
        if room < current then into_next = window * (1 - room / current) end
        retry = math.ceil((window - elapsed) + math.max(into_next, 0))
        if retry == 0 then retry = 1 end
      end
    end
    return allowed, math.max(math.floor(limit - used), 0), window - elapsed, retry, nil
  end,
  commit = function(keys, limit, window, burst, cost, now, state)
    redis.call("INCRBY", keys[1], cost)
    redis.call("PEXPIRE", keys[1], 2 * window)
  end,
}
