-- read.lua: the record as stored and the server's clock, for operators; writes nothing.
--
-- KEYS[1]  the record (format: record.lua)
-- Returns {now_ms, pttl_ms, raw record or false}; {now_ms, -2, false} when absent or
-- a tombstone (a forgotten record kept only for its fence, see forget.lua).
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, r = pcall(decode, raw)
  if ok and r and r.d and forgotten(r) then
    return {now_ms(), -2, false}
  end
end
return {now_ms(), redis.call('PTTL', KEYS[1]), raw}
