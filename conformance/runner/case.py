"""Running one case: a vhost of its own, the pipeline provisioned with the real `msgpipe`
binary, the steps in order, then a snapshot of every queue and the expectations."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker import REPO, BrokerError, Node
from checks import evaluate
from shim import Journal, Shim

NAMESPACE = "conformance"


class CaseAbort(Exception):
    """A step could not be carried out: the case fails with this rule and message."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


@dataclass
class Failure:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


@dataclass
class Outcome:
    name: str
    seconds: float
    failures: list[Failure]
    workdir: Path


def msgpipe_binary() -> Path:
    return REPO / "target" / "debug" / "msgpipe"


@dataclass
class CaseRun:
    case: dict
    node: Node
    shim_command: list[str]
    workdir: Path
    broken: str | None = None
    journal: Journal = field(default_factory=Journal)
    shims: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    snapshot: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.case["name"]

    @property
    def vhost(self) -> str:
        return f"conformance-{self.name}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "pipeline.json"

    @property
    def manifest_path(self) -> Path:
        return self.workdir / "pipeline.yaml"

    def fail(self, rule: str, message: str) -> None:
        self.failures.append(Failure(rule, message))

    # --- setup ------------------------------------------------------------------------------

    def manifest(self) -> dict:
        pipeline = copy.deepcopy(self.case["pipeline"])
        pipeline.setdefault("apiVersion", "msgpipe.io/v1alpha1")
        pipeline.setdefault("kind", "MessagePipeline")
        pipeline.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
        spec = pipeline.setdefault("spec", {})
        # The vhost comes from the URI the runner passes; the Secret is never read by apply.
        spec["broker"] = {"secretRef": {"name": "conformance"}}
        spec.setdefault("alerts", {"enabled": False})
        return pipeline

    def msgpipe(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MSGPIPE_BROKER_URI": self.node.amqp_uri(self.vhost),
               "MSGPIPE_MANAGEMENT_URI": self.node.mgmt}
        return subprocess.run([str(msgpipe_binary()), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    def render(self) -> dict:
        done = self.msgpipe("render", "-f", str(self.manifest_path), "-o", "json",
                            "--vhost", self.vhost)
        if done.returncode != 0:
            raise CaseAbort("J-1", f"msgpipe render failed: {done.stderr.strip()}")
        for document in json.loads(done.stdout):
            if document.get("kind") == "ConfigMap":
                return json.loads(document["data"]["pipeline.json"])
        raise CaseAbort("J-1", "msgpipe render printed no ConfigMap")

    def apply(self) -> None:
        done = self.msgpipe("apply", "-f", str(self.manifest_path))
        if done.returncode != 0:
            raise CaseAbort("SETUP", f"msgpipe apply failed: {done.stderr.strip()[-400:]}")

    def setup(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.manifest_path.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        self.node.create_vhost(self.vhost)
        self.config = self.render()
        self.write_config(self.config)
        if self.case.get("provision", True):
            self.apply()

    def write_config(self, config) -> None:
        """Replaces pipeline.json in one step (rename), as a ConfigMap update does."""
        text = config if isinstance(config, str) else json.dumps(config, indent=2) + "\n"
        staged = self.workdir / "pipeline.json.new"
        staged.write_text(text)
        os.replace(staged, self.config_path)

    # --- names ------------------------------------------------------------------------------

    def queue(self, alias: str) -> str:
        if alias == "work":
            return self.config["queue"]
        if alias == "dlq":
            return self.config["dead_letter"]["queue"]
        if alias.startswith("tier:"):
            return self.config["retry"]["tiers"][int(alias[5:]) - 1]["queue"]
        return alias

    def shim(self, step: dict) -> Shim:
        name = step.get("shim", "a")
        shim = self.shims.get(name)
        if shim is None or not shim.alive():
            raise CaseAbort("SHIM", f"shim {name!r} is not running")
        return shim

    # --- steps ------------------------------------------------------------------------------

    def run_steps(self) -> None:
        for index, step in enumerate(self.case["steps"]):
            action = step["do"]
            handler = getattr(self, "do_" + action, None)
            if handler is None:
                raise CaseAbort("CASE", f"step {index}: unknown step {action!r}")
            handler(step)

    def do_start(self, step: dict) -> None:
        name = step.get("shim", "a")
        state = self.workdir / f"state-{name}"
        state.mkdir(exist_ok=True)
        env = {"MSGPIPE_URI": self.node.amqp_uri(self.vhost),
               "MSGPIPE_PIPELINE_CONFIG": str(self.config_path),
               "MSGPIPE_SHIM_STATE_DIR": str(state),
               "MSGPIPE_SHIM_FLAG_POLL_MS": "200"}
        if self.broken:
            env["MSGPIPE_SHIM_BROKEN"] = self.broken
        shim = Shim(name, self.shim_command, env, self.journal,
                    self.workdir / f"shim-{name}.log", REPO)
        self.shims[name] = shim
        if shim.wait_event(lambda e: e.get("event") in ("ready", "_exit"), 30) is None \
                or not shim.alive():
            raise CaseAbort("SHIM", f"shim {name!r} did not print ready")

    def do_publish(self, step: dict) -> None:
        ids = step["ids"] if "ids" in step else [step["id"]]
        shim = self.shim(step)
        for message_id in ids:
            command = {"op": "publish", "id": message_id,
                       "body": step.get("body", f"body of {message_id}")}
            if "headers" in step:
                command["headers"] = step["headers"]
            shim.send(command)
            event = shim.wait_event(lambda e: e.get("event") == "published"
                                    and e.get("id") == message_id, step.get("timeout", 30))
            rule = step.get("rule", "P-2")
            if event is None:
                raise CaseAbort(rule, f"publish {message_id}: no `published` event")
            expected = step.get("expect")
            if expected is not None:
                allowed = expected if isinstance(expected, list) else [expected]
                result = event.data.get("result")
                if result not in allowed:
                    detail = f" ({event.data.get('error')})" if event.data.get("error") else ""
                    self.fail(rule, f"publish {message_id}: result {result!r}{detail}, "
                                    f"expected {' or '.join(allowed)}")

    def do_start_publisher(self, step: dict) -> None:
        shim = self.shim(step)
        shim.send({"op": "start_publisher"})
        if shim.wait_event(lambda e: e.get("event") == "publisher_started", 30) is None:
            raise CaseAbort(step.get("rule", "P-3"), "no `publisher_started` event")

    def do_consume(self, step: dict) -> None:
        shim = self.shim(step)
        shim.send({"op": "consume", "script": step.get("script", {}),
                   "default": step.get("default", ["ok"])})
        answer = shim.wait_event(lambda e: e.get("event") in ("consuming", "error"), 30)
        if step.get("expect_error"):
            if answer is None or answer.data.get("event") != "error":
                self.fail(step.get("rule", "J-2"), "the consumer started; expected an `error` event")
        elif answer is None or answer.data.get("event") != "consuming":
            detail = f": {answer.data.get('message')}" if answer else ""
            raise CaseAbort(step.get("rule", "C-14"), f"no `consuming` event{detail}")

    def do_publish_raw(self, step: dict) -> None:
        """Publishes through the management API, as another client would (no id when the
        step names none)."""
        for message_id in step.get("ids", [step.get("id")]):
            properties = dict(step.get("properties", {}))
            if message_id is not None:
                properties["message_id"] = message_id
            if "headers" in step:
                properties["headers"] = step["headers"]
            properties.setdefault("delivery_mode", 2)
            exchange = step.get("exchange", self.config["exchange"])
            routing_key = step.get("routing_key", self.config["routing_key"])
            routed = self.node.publish_raw(self.vhost, exchange, routing_key,
                                           step.get("body", "raw"), properties)
            if not routed:
                raise CaseAbort("CASE", f"raw publish of {message_id} was not routed")

    def do_stop(self, step: dict) -> None:
        name = step.get("shim", "a")
        shim = self.shims.get(name)
        if shim is None:
            raise CaseAbort("SHIM", f"no shim {name!r}")
        graceful = shim.stop(step.get("timeout", 20))
        if not graceful and step.get("graceful", True):
            self.fail(step.get("rule", "C-11"), f"shim {name!r} did not stop gracefully "
                                                "(no exit 0 after `stop`)")
        elif shim.wait_event(lambda e: e.get("event") == "stopped", 0) is None:
            self.fail(step.get("rule", "C-11"), f"shim {name!r} exited without `stopped`")

    def do_kill(self, step: dict) -> None:
        self.shim(step).kill()

    def do_wait(self, step: dict) -> None:
        time.sleep(step["seconds"])

    def do_mark(self, step: dict) -> None:
        self.marks[step["name"]] = time.monotonic()

    def do_wait_until(self, step: dict) -> None:
        deadline = time.monotonic() + step.get("timeout", 10)
        while True:
            if self.condition(step):
                if "record" in step:
                    self.marks[step["record"]] = time.monotonic()
                return
            if time.monotonic() > deadline:
                return  # the expectations say what is wrong
            time.sleep(0.1)

    def condition(self, step: dict) -> bool:
        if "holds" in step:
            held = {m["properties"].get("message_id")
                    for m in self.node.peek(self.vhost, self.queue(step["queue"]))}
            return set(step["holds"]) <= held
        if "peek_count" in step:
            held = self.node.peek(self.vhost, self.queue(step["queue"]))
            return len(held) >= step["peek_count"]
        if "messages" in step:
            info = self.node.queue_info(self.vhost, self.queue(step["queue"]))
            return bool(info) and info.get("messages") == step["messages"]
        if "event" in step:
            wanted = step["event"]
            found = [e for e in self.journal.events
                     if all(e.data.get(k) == v for k, v in wanted.items())]
            return len(found) >= step.get("count", 1)
        raise CaseAbort("CASE", f"wait_until without a condition: {step}")

    def do_broker_restart(self, step: dict) -> None:
        self.node.restart()
        self.do_broker_restart_wait()

    def do_broker_restart_wait(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = self.node.queue_info(self.vhost, self.config["queue"])
            if info and info.get("state", "running") == "running":
                return
            time.sleep(0.3)
        raise CaseAbort("CASE", "the work queue did not come back after the restart")

    def do_broker_stop(self, step: dict) -> None:
        done = self.node.script("ctl", "stop_app", timeout=120)
        if done.returncode != 0:
            raise CaseAbort("RUNNER", f"rabbitmqctl stop_app failed: {done.stderr[-300:]}")

    def do_broker_start(self, step: dict) -> None:
        done = self.node.script("ctl", "start_app", timeout=120)
        if done.returncode != 0:
            raise CaseAbort("RUNNER", f"rabbitmqctl start_app failed: {done.stderr[-300:]}")
        self.node.wait_ready()
        self.do_broker_restart_wait()

    def do_check(self, step: dict) -> None:
        """Expectations evaluated now, on the queues as they are now (peeked: cases use it on
        classic queues, where a peek does not count as a delivery)."""
        self.snapshot = {queue: self.node.peek(self.vhost, queue)
                         for queue in self.node.queue_names(self.vhost)}
        for rule, message in evaluate(self, step["expect"]):
            self.fail(rule, f"(during the run) {message}")

    def do_link_down(self, step: dict) -> None:
        self.node.link_down(self.vhost)

    def do_link_up(self, step: dict) -> None:
        self.node.link_up(self.vhost)

    def do_apply(self, step: dict) -> None:
        self.apply()

    def do_delete(self, step: dict) -> None:
        what = step["object"]
        config, vhost = self.config, self.vhost
        if what == "work_exchange":
            self.node.delete_exchange(vhost, config["exchange"])
        elif what == "retry_exchange":
            self.node.delete_exchange(vhost, config["retry"]["exchange"])
        elif what == "dead_letter_exchange":
            self.node.delete_exchange(vhost, config["dead_letter"]["exchange"])
        elif what == "tier":
            self.node.delete_queue(vhost, self.queue(f"tier:{step.get('tier', 1)}"))
        elif what == "work_binding":
            self.node.delete_bindings(vhost, config["exchange"], config["queue"])
        elif what == "dead_letter_binding":
            self.node.delete_bindings(vhost, config["dead_letter"]["exchange"],
                                      config["dead_letter"]["queue"])
        elif what == "pipeline":
            for exchange in (config["exchange"], config["retry"]["exchange"],
                             config["dead_letter"]["exchange"]):
                self.node.delete_exchange(vhost, exchange)
            for queue in self.node.queue_names(vhost):
                self.node.delete_queue(vhost, queue)
        else:
            raise CaseAbort("CASE", f"delete: unknown object {what!r}")

    def do_set_flags(self, step: dict) -> None:
        self.config = copy.deepcopy(self.config)
        for key in ("retry_pending", "retry_interval_seconds"):
            if key in step:
                self.config["features"][key] = step[key]
        self.write_config(self.config)

    def do_set_config(self, step: dict) -> None:
        self.config = copy.deepcopy(self.config)
        self.config.update(step["values"])
        self.write_config(self.config)

    def do_write_config_text(self, step: dict) -> None:
        self.write_config(step["text"])

    # --- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Stops every shim still running (gracefully, else SIGKILL), then reads every queue."""
        for shim in self.shims.values():
            if shim.alive():
                shim.stop(10)
        for queue in self.node.queue_names(self.vhost):
            self.snapshot[queue] = self.node.peek(self.vhost, queue)
        (self.workdir / "queues.json").write_text(json.dumps(self.snapshot, indent=1))


def run_case(case: dict, node: Node, shim_command: list[str], workroot: Path,
             broken: str | None = None) -> Outcome:
    started = time.monotonic()
    run = CaseRun(case, node, shim_command, workroot / case["name"], broken)
    try:
        run.setup()
        run.run_steps()
    except CaseAbort as abort:
        run.fail(abort.rule, abort.message)
    except (BrokerError, OSError, subprocess.SubprocessError) as error:
        run.fail("RUNNER", f"{type(error).__name__}: {error}")
    finally:
        try:
            run.finish()
        except (BrokerError, OSError) as error:
            run.fail("RUNNER", f"reading the queues: {error}")
    if not any(f.rule in ("SETUP", "RUNNER", "CASE") for f in run.failures):
        for rule, message in evaluate(run, case.get("expect", [])):
            run.fail(rule, message)
    leaked = credential_leaks(run)
    if leaked:
        run.fail("L-1", f"the shim printed its URI's password {leaked} times (first: {leaked[0]})")
    if not run.failures:
        node.delete_vhost(run.vhost)
        shutil.rmtree(run.workdir, ignore_errors=True)
    return Outcome(case["name"], time.monotonic() - started, run.failures, run.workdir)


def credential_leaks(run: CaseRun) -> list[str]:
    """Every case also checks L-1: no log line or event shows the URI's password."""
    secret = f":{run.node.password}@"
    texts = [line.text for line in run.journal.logs]
    texts += [json.dumps(record.data) for record in run.journal.events]
    return [text[:120] for text in texts if secret in text]


def load_cases(directory: Path) -> list[dict]:
    cases = []
    for path in sorted(directory.glob("*.json")):
        case = json.loads(path.read_text())
        if case.get("name") != path.stem:
            raise ValueError(f"{path}: name {case.get('name')!r} must be the file name")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", case["name"]):
            raise ValueError(f"{path}: name must be lowercase words joined by '-'")
        for expectation in case.get("expect", []):
            if not re.fullmatch(r"[A-Z]-\d+", expectation.get("rule", "")):
                raise ValueError(f"{path}: every expectation cites a rule: {expectation}")
        cases.append(case)
    return cases
