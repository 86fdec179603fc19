-- index_add: members into an index kept in byte order (KEYS[1], a sorted set whose scores are
-- all 0, so ZRANGEBYLEX ranges by prefix) and their expiry times (KEYS[2], scored by wall-clock
-- ms). A few members that expired are dropped first, so the index tracks what is alive.
-- ARGV: expires_ms, now_ms, prune, member...
local expires, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local old = redis.call("ZRANGEBYSCORE", KEYS[2], "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))
if #old > 0 then
  redis.call("ZREM", KEYS[1], unpack(old))
  redis.call("ZREM", KEYS[2], unpack(old))
end
for i = 4, #ARGV do
  redis.call("ZADD", KEYS[1], 0, ARGV[i])
  redis.call("ZADD", KEYS[2], "GT", expires, ARGV[i])
end
local ttl = expires - now
if ttl > 0 and redis.call("PTTL", KEYS[1]) < ttl then
  redis.call("PEXPIRE", KEYS[1], ttl)
  redis.call("PEXPIRE", KEYS[2], ttl)
end
return 0
