"""Reading the request stream: a Lua script reads entries for this consumer and measures each inside Redis, so an
entry over MAX_READ_BYTES never reaches the operator whole; entries come as bytes, decoded field by field later."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gpujob.api.models import DNS_LABEL_PATTERN, JOB_ID_PATTERN
from gpujob.api.request import ENTRY_JOB, MAX_ENTRY_BYTES, Entry, InvalidEntry, parse_entry

Fields = dict[bytes, bytes]
MAX_READ_BYTES = 2 * MAX_ENTRY_BYTES  # a whole entry (all names and values); larger ones come cut
PREVIEW_BYTES = 1024  # what is kept of each field of an entry over MAX_READ_BYTES (at most PREVIEW_FIELDS)
PREVIEW_FIELDS = 16

# Reads entries for this consumer, one XREADGROUP (COUNT 1) at a time so Redis holds one entry in Lua at once,
# and replies {id, size, fields}: size -1 for an entry trimmed while pending, fields cut when over the limit.
# ARGV: mode (new|own|claim), group, consumer, count, start ('>', an id, or the claim cursor), max bytes,
# preview bytes, preview fields, min idle ms (claim). claim replies {next cursor, entries, ids deleted from
# the pending list (Redis 7)}; it claims ids only (JUSTID) and reads each entry by itself.
READ_SCRIPT = """
local mode, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local count, start = tonumber(ARGV[4]), ARGV[5]
local max_bytes, preview, preview_fields = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
local function add(id, fields)
  if not fields then out[#out + 1] = {id, -1, {}} return end
  local size = 0
  for i = 1, #fields do size = size + #fields[i] end
  if size <= max_bytes then out[#out + 1] = {id, size, fields} return end
  local cut = {}
  for i = 1, math.min(#fields, 2 * preview_fields) do cut[i] = string.sub(fields[i], 1, preview) end
  out[#out + 1] = {id, size, cut}
end
if mode == "claim" then
  local claimed = redis.call("XAUTOCLAIM", KEYS[1], group, consumer, ARGV[9], start, "COUNT", count, "JUSTID")
  for _, id in ipairs(claimed[2]) do
    local found = redis.call("XRANGE", KEYS[1], id, id)
    add(id, found[1] and found[1][2] or false)
  end
  return {claimed[1], out, claimed[3] or {}}
end
for _ = 1, count do
  local reply = redis.call("XREADGROUP", "GROUP", group, consumer, "COUNT", 1, "STREAMS", KEYS[1], start)
  local entry = reply and reply[1][2][1]
  if not entry then break end
  add(entry[1], entry[2])
  if start ~= ">" then start = entry[1] end
end
return out
"""


@dataclass(frozen=True)
class Read:
    """One entry as read: its fields as bytes (cut to a preview when `size` is over MAX_READ_BYTES)."""

    entry_id: str
    fields: Fields
    size: int  # bytes of all names and values; -1: trimmed or deleted while pending (nothing left of it)

    @property
    def gone(self) -> bool:
        return self.size < 0

    @property
    def cut(self) -> bool:
        return self.size > MAX_READ_BYTES

    def parsed(self) -> Entry | InvalidEntry:
        if self.cut:
            return InvalidEntry(f"entry is {self.size} bytes, over the {MAX_READ_BYTES} limit (its fields are cut "
                                f"to {PREVIEW_BYTES} bytes in this dead letter)")  # fmt: skip
        try:
            return parse_entry(self.fields)
        except InvalidEntry as exc:
            return exc


def reads_of(rows: list[Any]) -> list[Read]:
    reads = []
    for entry_id, size, flat in rows:
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        reads.append(Read(ident, dict(zip(flat[::2], flat[1::2], strict=True)), int(size)))
    return reads


def readable_job_id(fields: Fields) -> tuple[str, str | None] | None:
    """The jobId (and namespace, when valid) of an entry's `job` field, or None; total: never raises, whatever the
    bytes. The field is decoded leniently (a bad byte elsewhere in it does not hide the jobId); only a string
    matching JOB_ID_PATTERN counts. An entry cut for its size has no readable jobId (its JSON is cut)."""
    try:
        raw = fields.get(ENTRY_JOB.encode())
        if not isinstance(raw, bytes) or len(raw) > MAX_ENTRY_BYTES:
            return None
        data = json.loads(raw.decode("utf-8", errors="replace"))
        if not isinstance(data, dict):
            return None
        job_id, namespace = data.get("jobId"), data.get("namespace")
        if not isinstance(job_id, str) or len(job_id) > 128 or not re.fullmatch(JOB_ID_PATTERN, job_id):
            return None
        valid_namespace = isinstance(namespace, str) and re.fullmatch(DNS_LABEL_PATTERN, namespace) is not None
        return job_id, namespace if valid_namespace else None
    except Exception:  # RecursionError (nested too deep), anything else: no readable jobId
        return None
