//! Notifications end to end: a real RabbitMQ scraped by a real Prometheus with the pipeline's
//! rules, alerts sent to a real Alertmanager (Debian's `prometheus-alertmanager`) loaded with
//! the routes and receivers msgpipe generates (`render --alertmanager-fragment`: the
//! AlertmanagerConfig converted as the prometheus-operator does, secrets read from files),
//! delivering to a Slack-compatible webhook, an SMTP server and a PagerDuty Events v2
//! endpoint, all local to this test on 127.0.0.1.

#[path = "support/prometheus.rs"]
mod prometheus;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use msgpipe::plan::{DesiredState, notify};
use prometheus::{LivePrometheus, declare_dead_letter_path, queue_messages, wait_for};
use serde_json::{Value, json};
use support::{TestVhost, http, mgmt, plan_yaml, rule_file};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const ROUTING_KEY: &str = "R0UT1NGKEY0f2b9c1d8e7a6b5c4d3e2f1";
const SMTP_PASSWORD: &str = "smtp-s3cret-pw";

/// One HTTP request a local receiver got: its path and JSON body.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    body: Value,
}

type Inbox<T> = Arc<Mutex<Vec<T>>>;

/// An HTTP endpoint that records every JSON POST and answers `status` (Slack answers 200,
/// PagerDuty's Events API 202).
async fn http_receiver(status: u16) -> (SocketAddr, Inbox<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let inbox: Inbox<Received> = Arc::default();
    let recorded = inbox.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).await.ok()?;
                let path = request_line.split_whitespace().nth(1)?.to_string();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).await.ok()?;
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().ok()?;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).await.ok()?;
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                recorded
                    .lock()
                    .expect("inbox")
                    .push(Received { path, body });
                let answer = if status == 202 {
                    r#"{"status":"success","message":"Event processed"}"#
                } else {
                    "ok"
                };
                let response = format!(
                    "HTTP/1.1 {status} OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                reader.get_mut().write_all(response.as_bytes()).await.ok()
            });
        }
    });
    (addr, inbox)
}

/// One message the SMTP sink accepted.
#[derive(Clone, Debug)]
struct Mail {
    /// `\0user\0password` of AUTH PLAIN, decoded.
    auth: Option<String>,
    recipients: Vec<String>,
    /// The DATA section with quoted-printable soft breaks and escapes undone.
    text: String,
}

/// A minimal ESMTP server: EHLO (offering AUTH PLAIN), AUTH, MAIL, RCPT, DATA, QUIT.
async fn smtp_sink() -> (SocketAddr, Inbox<Mail>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let inbox: Inbox<Mail> = Arc::default();
    let recorded = inbox.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut mail = Mail {
                    auth: None,
                    recipients: vec![],
                    text: String::new(),
                };
                reply(&mut reader, "220 localhost ESMTP test sink").await?;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.ok()? == 0 {
                        return Some(());
                    }
                    let command = line.trim_end().to_string();
                    let verb = command
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    let answer = match verb.as_str() {
                        "EHLO" | "HELO" => "250-localhost\r\n250-AUTH PLAIN\r\n250 8BITMIME",
                        "AUTH" => {
                            let encoded = command.split_whitespace().nth(2).unwrap_or_default();
                            let decoded = base64::engine::general_purpose::STANDARD
                                .decode(encoded)
                                .ok()?;
                            mail.auth = Some(String::from_utf8_lossy(&decoded).into_owned());
                            "235 2.7.0 Authentication successful"
                        }
                        "RCPT" => {
                            mail.recipients.push(command.clone());
                            "250 OK"
                        }
                        "DATA" => {
                            reply(&mut reader, "354 End data with <CR><LF>.<CR><LF>").await?;
                            let mut data = String::new();
                            loop {
                                let mut line = String::new();
                                if reader.read_line(&mut line).await.ok()? == 0 {
                                    return Some(());
                                }
                                if line == ".\r\n" {
                                    break;
                                }
                                data.push_str(&line);
                            }
                            mail.text = decode_quoted_printable(&data);
                            recorded.lock().expect("inbox").push(mail.clone());
                            mail.recipients.clear();
                            "250 OK: queued"
                        }
                        "QUIT" => {
                            reply(&mut reader, "221 Bye").await?;
                            return Some(());
                        }
                        _ => "250 OK",
                    };
                    reply(&mut reader, answer).await?;
                }
            });
        }
    });
    (addr, inbox)
}

async fn reply(reader: &mut BufReader<tokio::net::TcpStream>, text: &str) -> Option<()> {
    let line = format!("{text}\r\n");
    reader.get_mut().write_all(line.as_bytes()).await.ok()
}

/// Undoes quoted-printable soft line breaks and `=XX` escapes (Alertmanager encodes both
/// email parts that way).
fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'=', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A real Alertmanager on a loopback port, clustering off.
struct LiveAlertmanager {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl LiveAlertmanager {
    fn start(config: &Value, dir: tempfile::TempDir) -> Self {
        assert!(
            PathBuf::from(ALERTMANAGER).exists(),
            "prometheus-alertmanager not found: run `make setup`"
        );
        std::fs::write(dir.path().join("alertmanager.yml"), config.to_string()).expect("config");
        let check = Command::new("amtool")
            .args(["check-config", "alertmanager.yml"])
            .current_dir(dir.path())
            .output()
            .expect("amtool runs");
        assert!(
            check.status.success(),
            "amtool check-config refused the configuration:\n{}",
            support::output_text(&check)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(ALERTMANAGER)
            .current_dir(dir.path())
            .args([
                "--config.file=alertmanager.yml",
                "--storage.path=data",
                &format!("--web.listen-address={addr}"),
                "--cluster.listen-address=",
                "--log.level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("alertmanager starts");
        let alertmanager = Self {
            child,
            addr,
            _dir: dir,
        };
        wait_for("Alertmanager ready", Duration::from_secs(30), || {
            http(
                "GET",
                &format!("http://{}/-/ready", alertmanager.addr),
                None,
                false,
            )
            .0 == 200
        });
        alertmanager
    }
}

impl Drop for LiveAlertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `value` to `<dir>/<secret>/<key>`, as an Alertmanager's mounted Secrets are laid out.
fn write_secret(dir: &Path, secret: &str, key: &str, value: &str) {
    std::fs::create_dir_all(dir.join(secret)).expect("secret dir");
    std::fs::write(dir.join(secret).join(key), value).expect("secret file");
}

/// The notes pipeline: PagerDuty for critical DLQ depth, Slack for DLQ alerts, email for all.
fn notes_pipeline(vhost: &str, pagerduty: SocketAddr, smtp: SocketAddr) -> DesiredState {
    plan_yaml(&format!(
        r##"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{ name: notes, namespace: notes-app }}
spec:
  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: "{vhost}" }}
  queue: {{ name: notes_queue, exchange: notes, routingKey: notes }}
  retry: {{ maxAttempts: 1 }}
  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}
  alerts:
    labels: {{ team: notes }}
    runbookUrl: https://wiki.example/runbooks/notes
    dlqDepth: {{ threshold: 5, for: 2s, severity: critical }}
    notify:
      - name: oncall
        pagerduty:
          routingKey: {{ name: notes-alerting, key: pagerduty-routing-key }}
          url: http://{pagerduty}/v2/enqueue
        alerts: [MsgpipeDeadLetterQueueDepth]
        severities: [critical]
        groupWait: 1s
        groupInterval: 1s
      - name: team-slack
        slack:
          webhookUrl: {{ name: notes-alerting, key: slack-webhook-url }}
          channel: "#notes-alerts"
        alerts: [MsgpipeDeadLetterQueueDepth, MsgpipeDeadLetterQueueGrowing]
        groupWait: 1s
        groupInterval: 1s
      - name: team-email
        email:
          to: [notes-team@example.com]
          smtp:
            smarthost: "{smtp}"
            from: alertmanager@example.com
            username: alertmanager
            password: {{ name: notes-smtp, key: password }}
            requireTls: false
        groupWait: 1s
        groupInterval: 1s
"##
    ))
}

/// Another pipeline of the same namespace, with no receivers: its alert (fires at once, its
/// queue does not exist) must reach none of the notes pipeline's receivers.
const AUDIT_PIPELINE: &str = r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: { name: audit, namespace: notes-app }
spec:
  broker: { secretRef: { name: rabbitmq }, vhost: "/" }
  queue: { name: audit_queue_that_does_not_exist }
  alerts:
    metricsMissing: { for: 1s, severity: critical }
"#;

fn texts(inbox: &Inbox<Received>) -> Vec<Value> {
    inbox
        .lock()
        .expect("inbox")
        .iter()
        .map(|r| r.body.clone())
        .collect()
}

fn mails(inbox: &Inbox<Mail>) -> Vec<Mail> {
    inbox.lock().expect("inbox").clone()
}

/// The per-alert lines every Slack and email notification must carry.
fn assert_says_what_to_do(text: &str) {
    for expected in [
        "Dead-letter queue notes_queue_dlq holds 8 messages",
        "Pipeline: notes-app/notes | queue: notes_queue_dlq | value: 8 | severity: critical",
        "Inspect: msgpipe dlq list -n notes-app --name notes",
        "Replay: msgpipe dlq replay -n notes-app --name notes --all",
        "Runbook: https://wiki.example/runbooks/notes",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn dlq_alert_reaches_slack_email_and_pagerduty_through_alertmanager_and_resolves() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (slack_addr, slack) = runtime.block_on(http_receiver(200));
    let (pagerduty_addr, pagerduty) = runtime.block_on(http_receiver(202));
    let (smtp_addr, smtp) = runtime.block_on(smtp_sink());

    let vhost = TestVhost::new("notify-live");
    let state = notes_pipeline(&vhost.name, pagerduty_addr, smtp_addr);
    let audit = plan_yaml(AUDIT_PIPELINE);
    declare_dead_letter_path(&vhost, &state);

    // Alertmanager: the fragment msgpipe renders, under a root route that notifies nobody,
    // with the Secrets as files where the fragment says they are.
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let slack_url = format!("http://{slack_addr}/services/T000/B000/XXXX");
    write_secret(&secrets, "notes-alerting", "slack-webhook-url", &slack_url);
    write_secret(
        &secrets,
        "notes-alerting",
        "pagerduty-routing-key",
        ROUTING_KEY,
    );
    write_secret(&secrets, "notes-smtp", "password", SMTP_PASSWORD);
    let config = state.alertmanager_config.as_ref().expect("notify set");
    let fragment = notify::alertmanager_fragment(&[config], secrets.to_str().expect("utf-8"));
    let fragment = serde_json::to_value(&fragment).expect("fragment");
    let mut receivers = vec![json!({"name": "nobody"})];
    receivers.extend(fragment["receivers"].as_array().expect("receivers").clone());
    let am_config = json!({
        "route": {"receiver": "nobody", "group_wait": "1s", "group_interval": "1s",
                  "routes": fragment["routes"]},
        "receivers": receivers,
    });
    let written = am_config.to_string();
    for secret in [ROUTING_KEY, SMTP_PASSWORD, slack_url.as_str()] {
        assert!(
            !written.contains(secret),
            "a secret value was copied into the config"
        );
    }
    let alertmanager = LiveAlertmanager::start(&am_config, dir);

    // Prometheus labels the series with the broker's namespace, as a ServiceMonitor would;
    // the alerts must still carry the pipeline's (the route's namespace matcher needs it).
    let rules = state.prometheus_rule.as_ref().expect("alerts");
    let audit_rules = audit.prometheus_rule.as_ref().expect("alerts");
    let _prometheus = LivePrometheus::start_with(
        rule_file(&[rules, audit_rules]),
        "/metrics/per-object",
        json!({}),
        Some(&alertmanager.addr),
        json!({"namespace": "rabbitmq-system"}),
    );

    // Eight dead letters: published, then rejected without requeue.
    let publish_path = format!("{}/publish", vhost.path("exchanges", "notes"));
    for i in 0..8 {
        mgmt(
            "POST",
            &publish_path,
            Some(
                json!({"properties": {"delivery_mode": 2}, "routing_key": "notes", "payload": format!("note {i}"), "payload_encoding": "string"}),
            ),
        );
    }
    mgmt(
        "POST",
        &format!("{}/get", vhost.path("queues", "notes_queue")),
        Some(json!({"count": 8, "ackmode": "reject_requeue_false", "encoding": "auto"})),
    );
    wait_for("8 dead letters in the DLQ", Duration::from_secs(30), || {
        queue_messages(&vhost, "notes_queue_dlq") == 8
    });

    let firing = |inbox: &Inbox<Received>| {
        texts(inbox)
            .into_iter()
            .any(|b| b.to_string().contains("FIRING") || b["event_action"] == "trigger")
    };
    wait_for(
        "Slack, PagerDuty and email notified",
        Duration::from_secs(90),
        || firing(&slack) && firing(&pagerduty) && !mails(&smtp).is_empty(),
    );

    if std::env::var_os("MSGPIPE_NOTIFY_DUMP").is_some() {
        // What each person receives, for docs: `MSGPIPE_NOTIFY_DUMP=1 ... --no-capture`.
        eprintln!("SLACK {:#}", texts(&slack)[0]);
        eprintln!("PAGERDUTY {:#}", texts(&pagerduty)[0]);
        eprintln!("EMAIL {}", mails(&smtp)[0].text);
    }
    // Slack: the channel, a title naming alert and pipeline, the text saying what to do.
    let slack_message = texts(&slack).remove(0);
    assert_eq!(
        slack.lock().expect("inbox")[0].path,
        "/services/T000/B000/XXXX"
    );
    assert_eq!(slack_message["channel"], "#notes-alerts");
    let attachment = &slack_message["attachments"][0];
    assert_eq!(
        attachment["title"],
        "[FIRING] MsgpipeDeadLetterQueueDepth notes-app/notes"
    );
    assert_says_what_to_do(attachment["text"].as_str().expect("text"));

    // Email: to the team, logged in with the password from the Secret file, same text.
    let mail = mails(&smtp).remove(0);
    assert_eq!(mail.recipients, ["RCPT TO:<notes-team@example.com>"]);
    assert_eq!(
        mail.auth.as_deref(),
        Some(format!("\0alertmanager\0{SMTP_PASSWORD}").as_str())
    );
    assert!(
        mail.text
            .contains("Subject: [FIRING] MsgpipeDeadLetterQueueDepth notes-app/notes"),
        "{}",
        mail.text
    );
    assert_says_what_to_do(&mail.text);

    // PagerDuty: an Events v2 trigger with the routing key from the Secret file, the mapped
    // severity, the commands in custom_details and the runbook as a link.
    let event = texts(&pagerduty).remove(0);
    assert_eq!(pagerduty.lock().expect("inbox")[0].path, "/v2/enqueue");
    assert_eq!(event["routing_key"], ROUTING_KEY);
    assert_eq!(event["event_action"], "trigger");
    assert_eq!(
        event["payload"]["summary"],
        "Dead-letter queue notes_queue_dlq holds 8 messages"
    );
    assert_eq!(event["payload"]["severity"], "critical");
    let details = &event["payload"]["custom_details"];
    assert_eq!(
        details["dlq_replay"],
        "msgpipe dlq replay -n notes-app --name notes --all"
    );
    assert_eq!(
        details["dlq_list"],
        "msgpipe dlq list -n notes-app --name notes"
    );
    assert_eq!(details["pipeline"], "notes-app/notes");
    assert_eq!(
        event["links"][0]["href"],
        "https://wiki.example/runbooks/notes"
    );

    // The audit pipeline's alert fired all along and reached none of these receivers.
    for body in texts(&slack).iter().chain(texts(&pagerduty).iter()) {
        assert!(!body.to_string().contains("audit"), "{body}");
    }
    assert!(mails(&smtp).iter().all(|m| !m.text.contains("audit")));

    // Purge: each receiver is told the alert resolved.
    mgmt(
        "DELETE",
        &format!("{}/contents", vhost.path("queues", "notes_queue_dlq")),
        None,
    );
    wait_for(
        "resolved notifications on Slack, PagerDuty and email",
        Duration::from_secs(90),
        || {
            texts(&slack).iter().any(|b| {
                b["attachments"][0]["title"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("[RESOLVED]"))
            }) && texts(&pagerduty)
                .iter()
                .any(|b| b["event_action"] == "resolve")
                && mails(&smtp).iter().any(|m| {
                    m.text
                        .contains("Subject: [RESOLVED] MsgpipeDeadLetterQueueDepth")
                })
        },
    );
    let resolve = texts(&pagerduty)
        .into_iter()
        .find(|b| b["event_action"] == "resolve")
        .expect("resolve event");
    assert_eq!(resolve["dedup_key"], event["dedup_key"]);
    let resolved_mail = mails(&smtp)
        .into_iter()
        .find(|m| m.text.contains("Subject: [RESOLVED]"))
        .expect("resolved mail");
    assert!(
        resolved_mail
            .text
            .contains("RESOLVED: Dead-letter queue notes_queue_dlq holds")
    );
}

/// `msgpipe render --alertmanager-fragment` on the billing example: what `amtool` accepts and
/// routes as the example's comments say (PagerDuty for DLQ depth, Slack for growth and retry
/// storms, email for everything; nothing for another pipeline or namespace).
#[test]
fn rendered_fragment_of_the_example_passes_amtool_and_routes_as_declared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    write_secret(
        &secrets,
        "billing-alerting",
        "pagerduty-routing-key",
        ROUTING_KEY,
    );
    write_secret(
        &secrets,
        "billing-alerting",
        "slack-webhook-url",
        "https://hooks.example/x",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args([
            "render",
            "-f",
            "examples/billing-notify.yaml",
            "--alertmanager-fragment",
        ])
        .args([
            "--secrets-dir",
            secrets.to_str().expect("utf-8"),
            "-o",
            "json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("msgpipe runs");
    assert!(output.status.success(), "{}", support::output_text(&output));
    let fragment: Value = serde_json::from_slice(&output.stdout).expect("json");
    let fragment = &fragment[0];
    let mut receivers = vec![json!({"name": "nobody"})];
    receivers.extend(fragment["receivers"].as_array().expect("receivers").clone());
    let config = json!({
        // team-email has no smtp block: the global settings apply.
        "global": {"smtp_smarthost": "smtp.example.com:587", "smtp_from": "am@example.com"},
        "route": {"receiver": "nobody", "routes": fragment["routes"]},
        "receivers": receivers,
    });
    std::fs::write(dir.path().join("am.yml"), config.to_string()).expect("write");
    let amtool = |args: &[&str]| {
        let output = Command::new("amtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("amtool runs");
        assert!(output.status.success(), "{}", support::output_text(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    amtool(&["check-config", "am.yml"]);
    let route = |labels: &[&str]| {
        let mut args = vec!["config", "routes", "test", "--config.file=am.yml"];
        args.extend(labels);
        amtool(&args)
    };
    let own = ["namespace=billing", "msgpipe_pipeline=billing"];
    let with = |more: &[&'static str]| [own.as_slice(), more].concat();
    assert_eq!(
        route(&with(&[
            "alertname=MsgpipeDeadLetterQueueDepth",
            "severity=critical"
        ])),
        "billing/billing-notify/oncall,billing/billing-notify/team-email"
    );
    assert_eq!(
        route(&with(&[
            "alertname=MsgpipeDeadLetterQueueGrowing",
            "severity=warning"
        ])),
        "billing/billing-notify/team-slack,billing/billing-notify/team-email"
    );
    assert_eq!(
        route(&with(&["alertname=MsgpipeRetryStorm", "severity=warning"])),
        "billing/billing-notify/team-slack,billing/billing-notify/team-email"
    );
    assert_eq!(
        route(&with(&[
            "alertname=MsgpipeMetricsMissing",
            "severity=warning"
        ])),
        "billing/billing-notify/team-email"
    );
    // Same pipeline name in another namespace, another pipeline: nobody of billing's.
    assert_eq!(
        route(&[
            "namespace=other",
            "msgpipe_pipeline=billing",
            "alertname=MsgpipeDeadLetterQueueDepth"
        ]),
        "nobody"
    );
    assert_eq!(
        route(&[
            "namespace=billing",
            "msgpipe_pipeline=audit",
            "alertname=MsgpipeDeadLetterQueueDepth"
        ]),
        "nobody"
    );
}
