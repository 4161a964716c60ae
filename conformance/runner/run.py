#!/usr/bin/env python3
"""msgpipe conformance runner (protocol 1, kit version 1).

    python3 conformance/runner/run.py --lang rust [--case GLOB]
    python3 conformance/runner/run.py --lang rust --broken nack-instead-of-reject
    python3 conformance/runner/run.py --self-test

Starts its own RabbitMQ node (scripts/test-broker.sh ensure msgpipe-conformance 5705), gives
each case a vhost, provisions the case's pipeline with `msgpipe apply`, drives the language's
shim (conformance/shims.json) through the case's steps and checks what the broker and the
shim then show. One line per case; the last line is `conformance: N passed, M failed`.
Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import REPO, BrokerError, Node  # noqa: E402
from case import (CaseRun, Outcome, credential_leaks, load_cases, msgpipe_binary,  # noqa: E402
                  run_case)
from shim import LogLine  # noqa: E402
import schema  # noqa: E402

KIT = REPO / "conformance"
BROKEN_MODES = ("ack-before-confirm", "nack-instead-of-reject")


def shim_config(lang: str) -> dict:
    shims = json.loads((KIT / "shims.json").read_text())
    if lang not in shims:
        raise SystemExit(f"conformance: no shim for {lang!r} in conformance/shims.json "
                         f"(known: {', '.join(sorted(shims))})")
    return shims[lang]


def known_failures(lang: str) -> set[str]:
    path = KIT / "known-failures" / f"{lang}.txt"
    if not path.exists():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


def ensure_built(config: dict) -> None:
    """Runs the shim's build command (for Rust it builds `msgpipe` too). When the build fails
    but earlier binaries exist (the tree is shared and mid-edit), says so and uses them."""
    build = config.get("build")
    if build:
        done = subprocess.run(build, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            shim = REPO / config["command"][0]
            if not (msgpipe_binary().exists() and shim.exists()):
                raise SystemExit(f"conformance: build failed: {' '.join(build)}\n{tail}")
            print(f"conformance: WARNING: build failed ({' '.join(build)}); using the binaries "
                  f"built before:\n{tail}", flush=True)
    if not msgpipe_binary().exists():
        print("conformance: building msgpipe (cargo build --bin msgpipe)", flush=True)
        subprocess.run(["cargo", "build", "--workspace", "--bin", "msgpipe"], cwd=REPO,
                       check=True)


def verdict(outcome: Outcome, known: set[str]) -> str:
    """PASS, FAIL, XFAIL (a known failure that failed) or STALE (a known failure that passed:
    take it off the list)."""
    listed = outcome.name in known
    if outcome.failures:
        return "XFAIL" if listed else "FAIL"
    return "STALE" if listed else "PASS"


def check_rendered_schema(outcome_config: dict) -> list[str]:
    return schema.problems(outcome_config)


def run_suite(lang: str, pattern: str, broken: str | None, node: Node, workroot: Path,
              quiet: bool = False) -> tuple[list[tuple[Outcome, str]], float]:
    config = shim_config(lang)
    known = known_failures(lang) if not broken else set()
    cases = [c for c in load_cases(KIT / "cases") if fnmatch.fnmatch(c["name"], pattern)]
    if not cases:
        raise SystemExit(f"conformance: no case matches {pattern!r}")
    results = []
    started = time.monotonic()
    for case in cases:
        outcome = run_case(case, node, config["command"], workroot, broken)
        state = verdict(outcome, known)
        results.append((outcome, state))
        if quiet:
            continue
        print(f"{state:5} {outcome.name} ({outcome.seconds:.1f}s)", flush=True)
        for failure in outcome.failures:
            print(f"        {failure}", flush=True)
        if state == "STALE":
            print(f"        passes but is listed in conformance/known-failures/{lang}.txt: "
                  "remove it", flush=True)
        if state in ("FAIL", "XFAIL"):
            print(f"        shim logs: {outcome.workdir}", flush=True)
    return results, time.monotonic() - started


def summary(results, seconds: float) -> int:
    passed = sum(1 for _, s in results if s == "PASS")
    failed = sum(1 for _, s in results if s in ("FAIL", "STALE"))
    xfail = [o.name for o, s in results if s == "XFAIL"]
    print(f"conformance: took {seconds:.0f} s", flush=True)
    if xfail:
        print(f"conformance: {len(xfail)} known failures: {', '.join(xfail)}", flush=True)
    print(f"conformance: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def self_test(node: Node, workroot: Path) -> int:
    """The kit checks itself: the schema validator agrees with `jsonschema`, a stale
    known-failure entry fails the run, and each deliberately broken Rust consumer is caught
    by the cases that say they catch it, with a failure naming the rule."""
    problems = []
    # 1. The schema and both validators.
    docs = json.loads(subprocess.run(
        [str(msgpipe_binary()), "render", "-f", "examples", "-o", "json"], cwd=REPO,
        capture_output=True, text=True, check=True).stdout)
    configs = [json.loads(d["data"]["pipeline.json"]) for d in docs if d.get("kind") == "ConfigMap"]
    broken = dict(configs[0], version=2, features={"retry_pending": "yes"})
    try:
        import jsonschema  # optional: not in the standard library
        validator = jsonschema.Draft202012Validator(schema.load_schema())
        jsonschema.Draft202012Validator.check_schema(schema.load_schema())
    except ImportError:
        validator = None
        print("self-test: jsonschema not installed; the stdlib validator alone checks the schema")
    for config in configs:
        if schema.problems(config):
            problems.append(f"rendered pipeline.json breaks the schema: {schema.problems(config)}")
        if validator and list(validator.iter_errors(config)):
            problems.append("jsonschema rejects a rendered pipeline.json")
    if not schema.problems(broken) or (validator and not list(validator.iter_errors(broken))):
        problems.append("a broken pipeline.json passed the schema")
    print(f"self-test: {len(configs)} rendered pipeline.json files checked against the schema "
          f"({'stdlib validator and jsonschema' if validator else 'stdlib validator'})")
    # 2. Known-failure bookkeeping.
    fake = Outcome("x", 0, [], workroot)
    if verdict(fake, {"x"}) != "STALE" or verdict(fake, set()) != "PASS":
        problems.append("a listed case that passes is not reported stale")
    # A password in a shim's output is caught (L-1).
    leaky = CaseRun({"name": "x", "steps": []}, node, [], workroot)
    leaky.journal.add_log(LogLine(0, "a", f"cannot connect to {node.amqp_uri('v')}", "warn"))
    if not credential_leaks(leaky):
        problems.append("a URI with its password in a log line was not caught")
    # 3. Broken consumers must be caught, naming the rule.
    cases = load_cases(KIT / "cases")
    command = shim_config("rust")["command"]
    for mode in BROKEN_MODES:
        catching = [c for c in cases if mode in c.get("catches", {})]
        if not catching:
            problems.append(f"no case says it catches {mode}")
        for case in catching:
            rule = case["catches"][mode]
            outcome = run_case(case, node, command, workroot / mode, broken=mode)
            rules = {f.rule for f in outcome.failures}
            caught = rule in rules
            print(f"self-test: --broken {mode}: {case['name']} "
                  f"{'FAILS naming ' + rule if caught else 'was NOT caught'} "
                  f"({outcome.seconds:.1f}s)", flush=True)
            for failure in outcome.failures:
                print(f"        {failure}", flush=True)
            if not caught:
                problems.append(f"--broken {mode}: {case['name']} did not fail with {rule} "
                                f"(failures: {sorted(rules) or 'none'})")
    for problem in problems:
        print(f"self-test: FAILED: {problem}")
    print(f"self-test: {'passed' if not problems else 'failed'}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lang", default="rust", help="shim to drive (conformance/shims.json)")
    parser.add_argument("--case", default="*", help="only cases whose name matches this glob")
    parser.add_argument("--broken", choices=BROKEN_MODES,
                        help="run the Rust shim with a deliberately wrong consumer")
    parser.add_argument("--self-test", action="store_true", help="check the kit itself")
    parser.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    parser.add_argument("--node", help="test-broker.sh node name (default: per language, "
                        "shims.json; msgpipe-conformance)")
    parser.add_argument("--port", type=int, help="its AMQP port (management: port + 10000)")
    args = parser.parse_args()
    if args.broken and args.lang != "rust":
        parser.error("--broken applies to the Rust shim only")
    lang = "rust" if args.self_test else args.lang
    config = shim_config(lang)
    if not args.no_build:
        ensure_built(config)
    node = Node(**config.get("node", {}))
    if args.node:
        node.name = args.node
    if args.port:
        node.port = args.port
    # One run per node at a time: cases restart the node and reuse vhost names.
    lock = open(Path(tempfile.gettempdir()) / f"msgpipe-conformance-{node.port}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"conformance: another run uses the node on port {node.port}; waiting for it",
              flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        version = node.ensure()
    except BrokerError as error:
        print(f"conformance: {error}", file=sys.stderr)
        return 2
    print(f"conformance: RabbitMQ {version} on 127.0.0.1:{node.port}, shim {lang}: "
          f"{' '.join(config['command'])}", flush=True)
    workroot = Path(tempfile.mkdtemp(prefix="msgpipe-conformance-"))
    if args.self_test:
        return self_test(node, workroot)
    results, seconds = run_suite(lang, args.case, args.broken, node, workroot)
    code = summary(results, seconds)
    print(f"conformance: work directory {workroot}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
