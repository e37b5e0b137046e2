"""The Lua scripts of the job store (:mod:`jobs.store`): each runs atomically inside Redis.

They name no key themselves (the store passes every key in ``KEYS``), so the layout stays in one place.
"""

# KEYS: the keys written; ARGV[1]: JSON list of [command, key index, arg...]. Checks every key's type first and
# writes nothing when one is wrong, then runs every command. A script runs atomically, so nothing else interleaves.
CHECKED_WRITE = """
local ops = cjson.decode(ARGV[1])
local want = {hset='hash', hdel='hash', zadd='zset', zrem='zset', sadd='set', srem='set', rpush='list',
              lpush='list', ltrim='list', set='string'}
for _, op in ipairs(ops) do
  local expected = want[op[1]]
  if expected then
    local actual = redis.call('TYPE', KEYS[op[2]])['ok']
    if actual ~= 'none' and actual ~= expected then
      return redis.error_reply('GUILDTYPE ' .. KEYS[op[2]] .. ' ' .. actual .. ' ' .. expected)
    end
  end
end
for _, op in ipairs(ops) do
  local args = {}
  for i = 3, #op do args[#args + 1] = op[i] end
  redis.call(op[1], KEYS[op[2]], unpack(args))
end
return #ops
"""

# KEYS[1]: the job; ARGV: claim token (JSON), heartbeat_at (JSON), progress (JSON or "" for none).
# Writes the beat only while the token still owns the job; returns {owned, stop_request or false}.
BEAT = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then return {0, false} end
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[3]) end
return {1, redis.call('HGET', KEYS[1], 'stop_request')}
"""

# KEYS: the waiting zset, the job, the unpublished zset; ARGV: the job id, now. Takes a parked job out of the waiting
# set and, only when it was there (one caller wins), clears its wait and marks it unpublished until its message is
# sent (so a crash before the send is repaired by the sweep). Returns 1 when it was parked.
UNPARK = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'waiting', 'null')
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  return 1
end
return 0
"""

LOCK_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
               "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
LOCK_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

# Kombu's Redis transport LPUSHes messages and BRPOPs them, so the right end of a queue's list is its head.
# Per-message priorities can't be used for "go first": kombu polls every queue's priority-0 list before any
# priority-3 list, which would break the strict high → normal → low order. Instead the job's message is moved
# to the head in one atomic script, found by its task id (= the job id) in the message headers (ARGV: the id as
# written raw and JSON-escaped, since a non-ASCII id may be written either way).
MOVE_TO_HEAD = """
local items = redis.call('lrange', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local item = items[i]
  if string.find(item, ARGV[1], 1, true) or string.find(item, ARGV[2], 1, true) then
    redis.call('lrem', KEYS[1], 1, item)
    redis.call('rpush', KEYS[1], item)
    return 1
  end
end
return 0
"""
