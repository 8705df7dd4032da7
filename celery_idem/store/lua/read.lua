-- read.lua: the record as stored and the server's clock, for operators; writes nothing.
--
-- KEYS[1]  the record (format: record.lua)
-- Returns {now_ms, pttl_ms, raw record or false}; pttl -2 when absent.
return {now_ms(), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1])}
