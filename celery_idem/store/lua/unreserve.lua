-- unreserve.lua: withdraw a reservation whose message could not be published, so the
-- next send publishes at once instead of handing out the id that was never sent.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  task id the reservation was made for
-- Returns 1 when withdrawn (deleted when the clock has passed its fence and it counted
-- no takeover; else free again, keeping both: a tombstone, as forget.lua leaves, when it
-- counted none; kept free when it carries durable steps), 0 when the record is not
-- that reservation (a worker claimed it, or it ran out and another took it): nothing changed.
local r = decode(redis.call('GET', KEYS[1]))
if not r or r.s ~= 'R' or r.i ~= ARGV[1] then
  return 0
end
local now = now_ms()
if r.n == 0 and r.f < now and r.r == '' then
  redis.call('DEL', KEYS[1])
  return 1
end
local free = {s = 'F', f = r.f, d = r.n == 0 and now or 0, n = r.n, o = '', a = '', i = '',
              c = '', r = ''}
if r.r ~= '' then
  -- Durable steps an earlier attempt left (kept by the reservation): kept again, as
  -- release.lua keeps them, in a free record (not a tombstone).
  free.d, free.a, free.r = 0, r.a, r.r
end
redis.call('SET', KEYS[1], encode(free), 'KEEPTTL')
return 1
