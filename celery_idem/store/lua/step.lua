-- step.lua: store one finished durable step of the attempt that owns the key (fenced).
-- Appended to the record's steps (format: record.lua), so a later attempt of the same
-- key (a retry, a redelivery, a takeover) gets it back in its claim's reply and does
-- not run the step again.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  the step's position in the run, from 1 (every step() call counts, replayed
--          ones included: the attempt saw the record's steps in its claim's reply)
-- ARGV[3]  the step's name
-- ARGV[4]  its occurrence (the n-th step of that name in the run, from 1)
-- ARGV[5]  codec tag of the value ('' = the value could not be kept; ARGV[6] says why)
-- ARGV[6]  the value, serialized
-- Returns 1 when stored (or already stored by this same attempt: a client retry after
-- a lost reply), 0 when the token no longer owns the key (taken over, released,
-- expired): nothing is written; -1 when the record holds fewer steps than the position
-- needs (a step of this attempt was never stored): nothing is written.
local r = decode(redis.call('GET', KEYS[1]))
if not r or r.s ~= 'P' or r.o ~= ARGV[1] then
  return 0
end
local count = step_count(r)
local position = tonumber(ARGV[2])
if position <= count then
  return 1
end
if position ~= count + 1 then
  return -1
end
local name, codec, value = ARGV[3], ARGV[5], ARGV[6]
local steps = ''
if count > 0 then
  steps = string.sub(r.r, #string.format("%d", count) + 2)
end
r.r = string.format("%d", count + 1) .. ':' .. steps .. #name .. ':' .. name .. ARGV[4] .. ':'
  .. string.format('%d', now_ms()) .. ':' .. #codec .. ':' .. codec .. #value .. ':' .. value
redis.call('SET', KEYS[1], encode(r), 'KEEPTTL')
return 1
