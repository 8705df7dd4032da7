-- record.lua: the record format, prepended to every other script (not run alone).
--
-- One Redis STRING per key, so a completed record with a 100-byte result stays
-- near 230 bytes (a hash would turn into a hashtable once a value passes
-- hash-max-listpack-value, 64 bytes by default, and double that):
--
--   <state><fence>:<deadline>:<len>:<owner><len>:<fingerprint><len>:<task id><len>:<codec><payload>
--
--   state        one byte: P in progress, F free (released), C/E/X completed
--                (result, cached error, no result kept)
--   fence        grows by one on every claim; survives a release
--   deadline     lease deadline in ms on the server's clock (0 unless P)
--   owner        token of the owning attempt ('' while parked for a retry)
--   fingerprint  arguments fingerprint ('' = not checked)
--   task id      the owner's, or the completing run's, Celery task id
--   codec        how the payload is serialized (see celery_idem/codec.py)
--   payload      everything after the codec, bytes as they are (no escaping)
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function read_number(v, pos)
  local colon = string.find(v, ':', pos, true)
  return tonumber(string.sub(v, pos, colon - 1)), colon + 1
end

local function read_field(v, pos)
  local n, start = read_number(v, pos)
  return string.sub(v, start, start + n - 1), start + n
end

local function decode(v)
  if not v then
    return nil
  end
  local r, pos = {s = string.sub(v, 1, 1)}, 2
  r.f, pos = read_number(v, pos)
  r.d, pos = read_number(v, pos)
  r.o, pos = read_field(v, pos)
  r.a, pos = read_field(v, pos)
  r.i, pos = read_field(v, pos)
  r.c, pos = read_field(v, pos)
  r.r = string.sub(v, pos)
  return r
end

local function encode(r)
  return r.s .. string.format('%d', r.f) .. ':' .. string.format('%d', r.d) .. ':'
    .. #r.o .. ':' .. r.o .. #r.a .. ':' .. r.a .. #r.i .. ':' .. r.i
    .. #r.c .. ':' .. r.c .. r.r
end

local function completed(r)
  return r.s == 'C' or r.s == 'E' or r.s == 'X'
end

