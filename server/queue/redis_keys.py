"""Redis key layout and the Lua scripts both sides use (each script is one atomic step).

| Key                        | Type          | Holds                                                        |
|----------------------------|---------------|--------------------------------------------------------------|
| `<p>:jobs`, group workers  | stream        | `id`, `msg` (JobMessage JSON); acked entries are deleted     |
| `<p>:jobs:dead`            | stream        | dead letters: id, reason, deliveries                         |
| `<p>:job:<id>`             | hash, TTL     | the job record (`server.queue.base`)                         |
| `<p>:input:<id>`           | string, TTL   | re-encoded input PNG                                         |
| `<p>:result:<id>`          | string, TTL   | result bytes                                                 |
| `<p>:events:<id>`          | stream, TTL   | `type`, `data` (JSON); entry ids are the SSE ids            |
| `<p>:cancel:<id>`          | string, TTL   | cancel flag the worker checks every step                    |
| `<p>:idem:<client>:<key>`  | string, TTL   | "<job id> <fingerprint>"                                     |
| `<p>:workers`              | hash          | worker name -> JSON stats, capabilities and heartbeat time  |
| `<p>:tokenizer:<sha256>`   | string, TTL   | a worker's tokenizer JSON (prompt tokens counted at submit) |

The job stream is bounded by admission (`max_queue_depth`), never by MAXLEN: only acknowledged
entries are deleted (with XDEL, in the same script as the XACK).
"""

from __future__ import annotations

GROUP = "workers"
# A shared tokenizer outlives its last worker by this long (every heartbeat renews it).
TOKENIZER_TTL_S = 86400


class Keys:
    def __init__(self, prefix: str) -> None:
        self.p = prefix
        self.stream = f"{prefix}:jobs"
        self.dead = f"{prefix}:jobs:dead"
        self.workers = f"{prefix}:workers"

    def job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def input(self, job_id: str) -> str:
        return f"{self.p}:input:{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.p}:result:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.p}:events:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.p}:cancel:{job_id}"

    def tokenizer(self, sha256: str) -> str:
        return f"{self.p}:tokenizer:{sha256}"

    def idem(self, scoped_key: str) -> str:
        return f"{self.p}:idem:{scoped_key}"


# Entries after the group's last-delivered id: jobs no worker has taken yet.
_WAITING = """
local function last_delivered(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and groups.err then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    return '0-0'
  end
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == group then return last end
  end
  redis.call('XGROUP', 'CREATE', stream, group, '0')
  return '0-0'
end
"""

# KEYS: stream, job, events, input, idem.  ARGV: group, max_depth, job_id, msg, fingerprint, job_ttl,
# idem_ttl, use_idem, image (or ''), events_maxlen, now, prefix, then record fields (k, v, ...).
SUBMIT = (
    _WAITING
    + """
if ARGV[8] == '1' then
  local prev = redis.call('GET', KEYS[5])
  if prev then
    local sp = string.find(prev, ' ', 1, true)
    local jid, fp = string.sub(prev, 1, sp - 1), string.sub(prev, sp + 1)
    if redis.call('EXISTS', ARGV[12] .. ':job:' .. jid) == 1 then
      if fp ~= ARGV[5] then return {'mismatch', jid} end
      return {'existing', jid}
    end
  end
end
local last = last_delivered(KEYS[1], ARGV[1])
local max_depth = tonumber(ARGV[2])
local waiting = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', max_depth + 1)
if #waiting >= max_depth then return {'full', tostring(#waiting)} end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'msg', ARGV[4])
local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], 'stream_id', entry, unpack(fields))
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[9] ~= '' then redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[6]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*', 'type', 'queued',
  'data', '{"position": ' .. #waiting .. '}')
redis.call('EXPIRE', KEYS[3], ARGV[6])
if ARGV[8] == '1' then redis.call('SET', KEYS[5], ARGV[3] .. ' ' .. ARGV[5], 'EX', ARGV[7]) end
return {'created', ARGV[3]}
"""
)

# KEYS: stream.  ARGV: group, entry id.  -> jobs ahead of it (0 when taken or gone).
POSITION = (
    _WAITING
    + """
local last = last_delivered(KEYS[1], ARGV[1])
return #redis.call('XRANGE', KEYS[1], '(' .. last, '(' .. ARGV[2])
"""
)

# KEYS: job, cancel, events.  ARGV: ttl, now, events_maxlen.  A queued job ends now; a running one is
# flagged for its worker; a finished one is left alone.
CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return nil end
if st == 'queued' or st == 'running' then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type', 'cancelled', 'data', '{}')
  redis.call('EXPIRE', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job, events.  ARGV: ttl, now, maxlen, message, event data.  Only a job still queued.
EXPIRE_QUEUED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error_code', 'queue_timeout',
           'error_message', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'failed', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

_TERMINAL = """
local function terminal(st)
  return (not st) or st == 'succeeded' or st == 'failed' or st == 'cancelled'
end
"""

# KEYS: job, events.  ARGV: type, data, maxlen, ttl, fields...  Nothing after a terminal status.
PUBLISH = (
    _TERMINAL
    + """
if terminal(redis.call('HGET', KEYS[1], 'status')) then return 0 end
if #ARGV > 4 then
  local fields = {}
  for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: stream, job, events, result, input, cancel.  ARGV: group, entry, type, data, maxlen, ttl,
# result ('' for none), has_result, fields...  Writes result + status + event, then acks: one step.
# A job already finished (a duplicate delivery) is only acked.
FINISH = (
    _TERMINAL
    + """
local done = terminal(redis.call('HGET', KEYS[2], 'status'))
if not done then
  if ARGV[8] == '1' then
    redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[6])
    redis.call('HINCRBY', KEYS[2], 'completions', 1)
  end
  local fields = {}
  for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
  if #fields > 0 then redis.call('HSET', KEYS[2], unpack(fields)) end
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[3], 'data', ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if done then return 0 end
return 1
"""
)

# KEYS: stream, job, events.  ARGV: group, entry, job id, msg, maxlen.  Re-queue a copy, ack the original.
HAND_BACK = (
    _TERMINAL
    + """
-- No longer pending: a retry of this call (its first run landed) or another owner's; re-adding
-- would duplicate the job.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if terminal(redis.call('HGET', KEYS[2], 'status')) then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'msg', ARGV[4])
redis.call('HSET', KEYS[2], 'status', 'queued', 'stream_id', entry)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', 'queued', 'data', '{"handed_back": true}')
return 1
"""
)

# KEYS: stream, dead, job, events.  ARGV: group, entry, job id, reason, deliveries, maxlen, ttl, now,
# dead_maxlen, message.
DEAD_LETTER = (
    _TERMINAL
    + """
-- No longer pending: a retry whose first run landed; a second dead letter would duplicate it.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'id', ARGV[3], 'entry', ARGV[2],
  'reason', ARGV[4], 'deliveries', ARGV[5])
if not terminal(redis.call('HGET', KEYS[3], 'status')) then
  redis.call('HSET', KEYS[3], 'status', 'failed', 'error_code', 'dead_lettered', 'error_message', ARGV[10],
    'finished_at', ARGV[8])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'type', 'failed',
    'data', cjson.encode({code = 'dead_lettered', message = ARGV[10]}))
  redis.call('EXPIRE', KEYS[4], ARGV[7])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: stream.  ARGV: group, consumer, entry ids...  Resets the idle time of the entries this
# consumer still owns (JUSTID: no delivery counted); returns those it lost to a reclaim, which
# must not be taken back (two workers would run the job).
REFRESH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""
