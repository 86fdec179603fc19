-- Decide every limit of one request atomically, in one round trip (loaded after the algorithms).
-- ARGV: now_ms, then per limit: algorithm, key count, limit, window_ms, burst, cost.
-- KEYS: each limit's keys in order (they share a hash tag, so this runs on Redis Cluster too).
-- Every limit is checked first; state is written only when all allow, so a denied request does
-- not use up the other limits. Returns per limit: allowed (1/0), remaining, reset_ms, retry_ms.
local now = tonumber(ARGV[1])
local checks = {}
local all_allowed = true
local key_index, arg = 1, 2
while arg <= #ARGV do
  local algorithm = ALGORITHMS[ARGV[arg]]
  local count = tonumber(ARGV[arg + 1])
  local keys = {}
  for i = 1, count do keys[i] = KEYS[key_index + i - 1] end
  local limit, window = tonumber(ARGV[arg + 2]), tonumber(ARGV[arg + 3])
  local burst, cost = tonumber(ARGV[arg + 4]), tonumber(ARGV[arg + 5])
  local allowed, remaining, reset, retry, state = algorithm.check(keys, limit, window, burst, cost, now)
  checks[#checks + 1] = {algorithm, keys, limit, window, burst, cost, allowed, remaining, reset, retry, state}
  if not allowed then all_allowed = false end
  key_index = key_index + count
  arg = arg + 6
end
local out = {}
for _, c in ipairs(checks) do
  if all_allowed then c[1].commit(c[2], c[3], c[4], c[5], c[6], now, c[11]) end
  out[#out + 1] = c[7] and 1 or 0
  out[#out + 1] = c[8]
  out[#out + 1] = c[9]
  out[#out + 1] = c[10]
end
return out
