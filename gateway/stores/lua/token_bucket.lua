-- token_bucket: GCRA. `limit` per `window` on average, up to `burst` at once.
-- The twin of gateway/stores/algorithms.py:token_bucket_check.
-- State: KEYS[1] = the theoretical arrival time in ms (PX until it is reached).
ALGORITHMS["token_bucket"] = {
  check = function(keys, limit, window, burst, cost, now)
    local interval = window / limit
    if burst == 0 then burst = limit end
    local tat = tonumber(redis.call("GET", keys[1]) or now)
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - burst * interval
    if now >= allow_at then
      return true, math.floor((now - allow_at) / interval), math.ceil(new_tat - now), 0, new_tat
    end
    return false, 0, math.ceil(tat - now), math.ceil(allow_at - now), tat
  end,
  commit = function(keys, limit, window, burst, cost, now, new_tat)
    redis.call("SET", keys[1], string.format("%.3f", new_tat), "PX", math.max(math.ceil(new_tat - now), 1))
  end,
}
