"""The expectations of a case, evaluated on what the run saw: the shims' events and logs (with
the time the runner read them) and the final contents of every queue."""

from __future__ import annotations

import re
from datetime import datetime

from shim import SEVERITY

FORMATS = {
    "rfc3339-utc": re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"),
    "uuid": re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I),
}
OK_OUTCOMES = re.compile(r"^(ok|sleep:\d+)$")


def matches_format(value, name: str) -> bool:
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "text":
        return isinstance(value, str) and value != ""
    return isinstance(value, str) and bool(FORMATS[name].match(value))


def message_id(message: dict):
    return message.get("properties", {}).get("message_id")


def where(run, message_id_: str) -> list[str]:
    """The queues holding a copy of the message, one entry per copy."""
    return [queue for queue, messages in run.snapshot.items()
            for message in messages if message_id(message) == message_id_]


def ok_handled(run, message_id_: str) -> int:
    return sum(1 for e in run.journal.deliveries(message_id_)
               if OK_OUTCOMES.match(str(e.data.get("outcome"))))


def find_message(run, expectation: dict):
    queue = run.queue(expectation["queue"])
    messages = run.snapshot.get(queue, [])
    if "id" in expectation:
        found = [m for m in messages if message_id(m) == expectation["id"]]
        return found[0] if found else None, f"{expectation['id']} in {queue}"
    index = expectation.get("index", 0)
    return (messages[index] if index < len(messages) else None), f"message #{index} of {queue}"


def compare(value, expectation: dict, what: str) -> list[str]:
    problems = []
    if expectation.get("absent") and value is not None:
        problems.append(f"{what} is {value!r}, expected absent")
    if expectation.get("present") and value is None:
        problems.append(f"{what} is absent")
    if "equals" in expectation and value != expectation["equals"]:
        problems.append(f"{what} is {value!r}, expected {expectation['equals']!r}")
    if "not_equals" in expectation and value == expectation["not_equals"]:
        problems.append(f"{what} is {value!r}, expected anything else")
    if "contains" in expectation and (not isinstance(value, str)
                                      or expectation["contains"] not in value):
        problems.append(f"{what} is {value!r}, expected it to contain "
                        f"{expectation['contains']!r}")
    if "format" in expectation and not matches_format(value, expectation["format"]):
        problems.append(f"{what} is {value!r}, expected a {expectation['format']} value")
    return problems


def bounds(count, expectation: dict, what: str) -> list[str]:
    problems = []
    if "count" in expectation and count != expectation["count"]:
        problems.append(f"{what}: {count}, expected {expectation['count']}")
    if "min" in expectation and count < expectation["min"]:
        problems.append(f"{what}: {count}, expected at least {expectation['min']}")
    if "max" in expectation and count > expectation["max"]:
        problems.append(f"{what}: {count}, expected at most {expectation['max']}")
    return problems


def parse_time(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    return datetime.fromisoformat(text)


# --- one function per `check` --------------------------------------------------------------

def check_queue(run, e):
    queue = run.queue(e["queue"])
    held = [message_id(m) for m in run.snapshot.get(queue, [])]
    problems = []
    wanted = e.get("ids", [])
    if e.get("exact", True):
        if sorted(held, key=str) != sorted(wanted, key=str):
            problems.append(f"{queue} holds {held}, expected exactly {wanted}")
    else:
        missing = [i for i in wanted if i not in held]
        if missing:
            problems.append(f"{queue} lacks {missing} (holds {held})")
    for absent in e.get("excludes", []):
        if absent in held:
            problems.append(f"{queue} holds {absent}, which must not be there")
    if "messages" in e and len(held) != e["messages"]:
        problems.append(f"{queue} holds {len(held)} messages, expected {e['messages']}")
    return problems


def check_queue_order(run, e):
    queue = run.queue(e["queue"])
    held = [message_id(m) for m in run.snapshot.get(queue, [])]
    seen = [i for i in held if i in e["ids"]]
    return [] if seen == e["ids"] else [f"{queue} order {seen}, expected {e['ids']}"]


def check_header(run, e):
    message, what = find_message(run, e)
    if message is None:
        return [f"{what}: no such message"]
    headers = message.get("properties", {}).get("headers") or {}
    value = headers.get(e["header"])
    problems = compare(value, e, f"{what}: header {e['header']}")
    if "not_after" in e and value is not None:
        other = headers.get(e["not_after"])
        try:
            if other is None or parse_time(value) > parse_time(other):
                problems.append(f"{what}: {e['header']} {value} is after {e['not_after']} {other}")
        except ValueError as error:
            problems.append(f"{what}: cannot compare times: {error}")
    return problems


def check_property(run, e):
    message, what = find_message(run, e)
    if message is None:
        return [f"{what}: no such message"]
    if e["property"] == "routing_key":
        value = message.get("routing_key")
    else:
        value = message.get("properties", {}).get(e["property"])
    return compare(value, e, f"{what}: {e['property']}")


def check_handler_calls(run, e):
    deliveries = run.journal.deliveries(e["id"])
    if "attempt" in e:
        deliveries = [d for d in deliveries if d.data.get("attempt") == e["attempt"]]
    return bounds(len(deliveries), e, f"handler calls for {e['id']}")


def check_attempts(run, e):
    seen = [d.data.get("attempt") for d in run.journal.deliveries(e["id"])]
    if e.get("distinct"):
        seen = [a for i, a in enumerate(seen) if i == 0 or seen[i - 1] != a]
    return [] if seen == e["sequence"] else [
        f"attempts of {e['id']}: {seen}, expected {e['sequence']}"]


def check_attempt_delay(run, e):
    firsts = {}
    for d in run.journal.deliveries(e["id"]):
        firsts.setdefault(d.data.get("attempt"), d.at)
    if e["from"] not in firsts or e["to"] not in firsts:
        return [f"{e['id']}: attempts {e['from']} and {e['to']} were not both delivered "
                f"(saw {sorted(firsts, key=str)})"]
    waited = (firsts[e["to"]] - firsts[e["from"]]) * 1000
    return bounds(round(waited), {"min": e["min_ms"], "max": e["max_ms"]},
                  f"ms between attempt {e['from']} and {e['to']} of {e['id']}")


def check_redelivery_gaps(run, e):
    times = [d.at for d in run.journal.deliveries(e["id"])]
    gaps = [round((b - a) * 1000) for a, b in zip(times, times[1:])]
    problems = []
    if len(gaps) < e.get("min_gaps", 1):
        problems.append(f"{e['id']} was delivered {len(times)} times; expected more give-backs")
    short = [g for g in gaps if g < e.get("min_ms", 0)]
    if short:
        problems.append(f"{e['id']}: redelivered after {short} ms (gaps {gaps}); "
                        f"every give-back waits at least {e['min_ms']} ms")
    if e.get("growing"):
        cap = e.get("cap_ms", 30000)
        for before, after in zip(gaps, gaps[1:]):
            if after < 0.9 * min(before, cap):
                problems.append(f"{e['id']}: give-back pauses {gaps} ms do not grow")
                break
    return problems


def check_published(run, e):
    results = [r.data.get("result") for r in run.journal.events
               if r.data.get("event") == "published" and r.data.get("id") == e["id"]]
    allowed = e["result"] if isinstance(e["result"], list) else [e["result"]]
    if not results:
        return [f"{e['id']} was never published"]
    bad = [r for r in results if r not in allowed]
    return [f"{e['id']} published as {bad}, expected {allowed}"] if bad else []


def check_no_loss(run, e):
    lost = [i for i in e["ids"] if not where(run, i) and ok_handled(run, i) == 0]
    return [f"lost (in no queue, never handled with success): {lost}"] if lost else []


def check_duplicates(run, e):
    problems = []
    for i in e["ids"]:
        copies = len(where(run, i)) + ok_handled(run, i)
        if copies > 1 + e.get("max_extra", 0):
            problems.append(f"{i}: {copies} copies (queues {where(run, i)}, "
                            f"{ok_handled(run, i)} successful handler calls), "
                            f"at most {1 + e.get('max_extra', 0)} allowed")
    return problems


def window(run, e):
    start = run.marks.get(e["since"], float("-inf")) if "since" in e else float("-inf")
    end = run.marks.get(e["until"], float("inf")) if "until" in e else float("inf")
    return start, end


def check_log_lines(run, e):
    start, end = window(run, e)
    level = e.get("level", "any")
    floor = SEVERITY.get(level, -1)
    lines = [line for line in run.journal.logs
             if start <= line.at <= end and line.shim == e.get("shim", line.shim)
             and (level == "any" or SEVERITY.get(line.level or "", -1) >= floor)]
    problems = bounds(len(lines), e, f"{level} log lines")
    if problems:
        sample = "; ".join(line.text[:160] for line in lines[:6])
        problems = [f"{problems[0]} (first: {sample})"]
    return problems


def check_elapsed(run, e):
    if e["to"] not in run.marks:
        return [f"{e['to']} never happened"]
    if e["from"] not in run.marks:
        return [f"{e['from']} never happened"]
    seconds = run.marks[e["to"]] - run.marks[e["from"]]
    return [] if seconds <= e["max_s"] else [
        f"{e['to']} came {seconds:.1f} s after {e['from']}, expected within {e['max_s']} s"]


def check_event(run, e):
    start, end = window(run, e)
    found = [r for r in run.journal.events if start <= r.at <= end
             and all(r.data.get(k) == v for k, v in e["match"].items())]
    return bounds(len(found), e, f"events matching {e['match']}")


CHECKS = {name[6:]: function for name, function in globals().items()
          if name.startswith("check_")}


def describe(e: dict) -> str:
    subject = e.get("id") or e.get("queue") or e.get("header") or ""
    return f"{e['check']} {subject}".strip()


def evaluate(run, expectations: list[dict]):
    """(rule, message) for every expectation that does not hold."""
    for e in expectations:
        check = CHECKS.get(e["check"])
        if check is None:
            yield e["rule"], f"unknown check {e['check']!r}"
            continue
        for problem in check(run, e):
            why = f" ({e['why']})" if "why" in e else ""
            yield e["rule"], f"{describe(e)}: {problem}{why}"
