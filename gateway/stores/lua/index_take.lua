-- index_take: remove and return up to ARGV[2] members of the index KEYS[1] (and their expiry
-- times in KEYS[2]) that start with ARGV[1]. "\255" never occurs in UTF-8, so "[prefix\255"
-- bounds every member that starts with the prefix.
local found = redis.call("ZRANGEBYLEX", KEYS[1], "[" .. ARGV[1], "[" .. ARGV[1] .. "\255", "LIMIT", 0, tonumber(ARGV[2]))
if #found > 0 then
  redis.call("ZREM", KEYS[1], unpack(found))
  redis.call("ZREM", KEYS[2], unpack(found))
end
return found
