-- complete.lua: store the outcome of the attempt that owns the key (fenced).
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  fence of the attempt
-- ARGV[3]  kind: C (result), E (cached error), X (no result kept)
-- ARGV[4]  payload (serialized result, error, or the reason there is none)
-- ARGV[5]  codec tag of the payload
-- ARGV[6]  retention in ms
-- ARGV[7]  task id of the attempt
-- ARGV[8]  '+' when the attempt still has callbacks or a chain to send (the tracer
--          sends them after the body returns; dispatched.lua confirms), else ''
-- The run's durable steps are dropped; their count stays in the deadline field.
-- Returns 1 when stored (or already stored by this same attempt: a client retry
-- after a lost reply finds its own fence and task id), 0 when another attempt owns
-- the key now: nothing is written.
local r = decode(redis.call('GET', KEYS[1]))
if not r then
  return 0
end
if r.s ~= 'P' or r.o ~= ARGV[1] then
  if completed(r) and r.f == tonumber(ARGV[2]) and r.i == ARGV[7] then
    return 1
  end
  return 0
end
r.s, r.d, r.o, r.c, r.r = ARGV[3], step_count(r), ARGV[8], ARGV[5], ARGV[4]
redis.call('SET', KEYS[1], encode(r), 'PX', ARGV[6])
return 1
