-- read.lua: the whole record and the server's clock, for operators; writes nothing.
--
-- KEYS[1]  the record (see claim.lua)
-- Returns {now_ms, pttl_ms, field, value, field, value, ...}; pttl -2 when absent.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, redis.call('PTTL', KEYS[1])}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
  out[#out + 1] = v
end
return out
