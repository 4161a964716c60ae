//! `msgpipe dlq list|show|replay|purge`: a pipeline's dead letters, what failed and why, and
//! sending them back. The broker work is in [`crate::dlq`]; this file is flags and printing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;

use super::apply::BrokerArgs;
use super::{OutputFormat, print_documents, read_pipelines};
use crate::api::MessagePipeline;
use crate::api::replay::{
    DeadLetterReplay, DeadLetterReplaySpec, PipelineRef, REPLAY_RATE_MAX, ReplaySelectionSpec,
    StopWhenSpec,
};
use crate::broker::{BrokerEndpoint, install_crypto_provider};
use crate::dlq::detail::{hex_dump, is_printable_text};
use crate::dlq::summary::group;
use crate::dlq::{
    DeadLetter, DeadLetterDetail, DeadLetterQueue, FailureGroup, FailureWatch, Flow, GroupBy,
    RawDeadLetter, ReplayControl, ReplayOutcome, ReplayRun, ReplaySelection, StopWhen, Trip,
    replay,
};
use crate::plan::{self, DesiredState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with why they failed, and a summary grouped by error.
    ///
    /// Reads up to --limit dead letters from the head of the DLQ without taking them: each is
    /// fetched unacknowledged and handed back when the command closes its channel. A quorum
    /// DLQ counts that as a delivery (x-delivery-count goes up; msgpipe gives DLQs no delivery
    /// limit, so nothing is ever dropped for it) and the messages come back marked redelivered.
    ///
    /// The table shows, per dead letter: its position (#N, for `show '#N'`), message id, reason
    /// (the consumer's x-msgpipe-reason: permanent / max-attempts; else the broker's most recent
    /// x-death reason: rejected / expired / maxlen / delivery_limit), attempts, the last error
    /// (truncated; `show` has it all), first and last failure, original routing key and size.
    /// Below it, the summary: one line per distinct --group-by value, biggest first, with its
    /// count, reasons, time span and an example (#N). The summary covers the dead letters listed,
    /// so raise --limit to summarise more. -o json|yaml prints both as data.
    List(ListArgs),
    /// Show one dead letter: every property and header, and the body.
    ///
    /// ID is a message id, or #N for the N-th dead letter from the head as `list` numbers
    /// them (quote it: '#3'). Positions hold while nothing else reads or adds to the DLQ; a
    /// message id is the stable way. The body is printed as text when it is UTF-8 without
    /// control characters, else as a hex dump; with -o json|yaml it is UTF-8 text or base64.
    /// Reads the same way as `list` (nothing is taken from the DLQ).
    Show(ShowArgs),
    /// Send dead letters back to the pipeline's work queue, without losing any.
    ///
    /// For each selected dead letter: publish a copy to the work queue — through the default
    /// exchange, by the queue's name, so no other queue bound to the work exchange gets one;
    /// the routing key it was first published with stays in x-msgpipe-original-routing-key —
    /// on a publisher-confirm channel with mandatory set; only once the broker confirmed the
    /// copy is the dead letter removed. On a nack, a return, a timeout or a lost connection
    /// the dead letter is put back and the replay stops with an error saying how many were
    /// replayed.
    ///
    /// Selection (combine freely): --all, --id, --reason, --error-matches, --older-than,
    /// --newer-than, --limit. --rate paces the copies. Every run prints its replay id and
    /// stamps it on each copy (x-msgpipe-replay-id); --resume ID runs it again and skips dead
    /// letters carrying that id (copies of this replay that failed again), so an interrupted
    /// replay goes on without replaying them twice. A dead letter can still be delivered
    /// twice if the connection drops between the broker storing the copy and removing the
    /// dead letter; the copy keeps its message id and replay id, so consumers can drop it.
    ///
    /// The copy starts over as a first delivery: x-retry-count, the consumer's failure headers
    /// (error, reason, attempts, failure times) and the broker's x-death / x-first-death-* /
    /// x-delivery-count are removed; the original exchange and routing key headers stay; it is
    /// made persistent and gets x-msgpipe-replayed-at (now) and x-msgpipe-replay-count (+1).
    ///
    /// One run only considers the dead letters present when it starts, reads them one at a
    /// time (memory holds one message), and ends with a summary: replayed, skipped, remaining.
    ///
    /// --stop-when 10%/5m is the kill switch: the replay stops (non-zero exit, the rest left in
    /// the DLQ) when more than 10 % of the copies made in the last 5 minutes came back to the
    /// DLQ. --as-resource prints the same replay as a DeadLetterReplay for review instead of
    /// running it; the operator then runs it (see docs/replay.md).
    #[command(group(ArgGroup::new("selection").required(true).multiple(true).args(["all", "ids", "limit", "reason", "error_matches", "older_than", "newer_than", "resume"])))]
    Replay(Box<ReplayArgs>),
    /// Delete every dead letter in the DLQ, for good.
    ///
    /// Without --yes, asks on the terminal: type the DLQ's name to confirm. When standard
    /// input is not a terminal, refuses unless --yes is given. Prints how many were deleted.
    Purge(PurgeArgs),
}

/// Which pipeline: a manifest file, or a MessagePipeline in the cluster.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Pipeline manifest (YAML or JSON; - for stdin).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        required_unless_present = "name",
        conflicts_with_all = ["name", "namespace"]
    )]
    pub file: Option<PathBuf>,
    /// With -f: which pipeline, when the file holds several (name or namespace/name).
    #[arg(long, value_name = "NAME", requires = "file")]
    pub pipeline: Option<String>,
    /// Read the MessagePipeline NAME from the cluster (kubeconfig or in-cluster config), and
    /// its broker Secret (spec.broker.secretRef) unless --broker or --broker-secret-file is given.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// With --name: its namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, value_name = "NS", requires = "name")]
    pub namespace: Option<String>,
    /// With --name, for a pipeline that names a MessageBroker (spec.broker.brokerRef): the
    /// operator's namespace, where the broker's Secret is (reading it needs that permission).
    #[arg(
        long,
        value_name = "NS",
        env = "MSGPIPE_OPERATOR_NAMESPACE",
        default_value = "msgpipe-system"
    )]
    pub operator_namespace: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Dead letters to read, from the head of the DLQ.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// What the summary groups dead letters by.
    #[arg(long, value_enum, default_value_t)]
    pub group_by: GroupBy,
    /// Print data (yaml or json) instead of tables.
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Message id, or '#N' (position from the head, as `list` numbers them).
    pub id: String,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Dead letters to look through, from the head of the DLQ.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print data (yaml or json) instead of text.
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Replay every dead letter present when the replay starts (that the filters select).
    #[arg(long)]
    pub all: bool,
    /// Replay the dead letters with these message ids (repeat the flag or list several).
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub ids: Vec<String>,
    /// Replay at most N dead letters (the first N selected, from the head of the DLQ).
    #[arg(long = "limit", value_name = "N")]
    pub limit: Option<usize>,
    /// Only dead letters with this reason (permanent, max-attempts, rejected, expired,
    /// maxlen, delivery_limit).
    #[arg(long, value_name = "REASON")]
    pub reason: Option<String>,
    /// Only dead letters whose last error matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub error_matches: Option<String>,
    /// Only dead letters that last failed more than this long ago (e.g. 1h, 30m, 2d).
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,
    /// Only dead letters that last failed less than this long ago.
    #[arg(long, value_name = "DURATION")]
    pub newer_than: Option<String>,
    /// At most this many copies per second, e.g. 50/s (default: as fast as the broker
    /// confirms).
    #[arg(long, value_name = "N/s")]
    pub rate: Option<String>,
    /// Resume the replay of this id (printed by every replay): dead letters that carry it
    /// are copies that already went back and failed again, and are skipped.
    #[arg(long, value_name = "REPLAY_ID")]
    pub resume: Option<String>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Kill switch: stop when more than PCT % of the copies made in the last DURATION came
    /// back to the DLQ (failed again), e.g. 10%/5m. They are counted through a private queue
    /// bound to the dead-letter exchange for the run. The rest stays in the DLQ; --resume
    /// goes on.
    #[arg(long, value_name = "PCT%/DURATION")]
    pub stop_when: Option<String>,
    /// With --stop-when: copies made in the window before the ratio counts.
    #[arg(long, value_name = "N", requires = "stop_when", default_value_t = crate::dlq::stop::DEFAULT_MIN_SAMPLE)]
    pub stop_min_sample: u64,
    /// Print the equivalent DeadLetterReplay (YAML) instead of replaying, for review
    /// (GitOps); needs no broker. Relative times (--older-than) become absolute instants.
    #[arg(long, conflicts_with_all = ["dry_run", "resume"])]
    pub as_resource: bool,
    /// With --as-resource: the object's name (default: <pipeline>-replay-<UTC time>).
    #[arg(long, value_name = "NAME", requires = "as_resource")]
    pub resource_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

pub async fn run(args: &DlqArgs) -> anyhow::Result<()> {
    match &args.command {
        DlqCommand::List(list_args) => list(list_args).await,
        DlqCommand::Show(show_args) => show(show_args).await,
        DlqCommand::Replay(replay_args) => replay(replay_args).await,
        DlqCommand::Purge(purge_args) => purge(purge_args).await,
    }
}

/// A pipeline's planned names, the broker it lives on, and its open DLQ.
struct Target {
    state: DesiredState,
    dlq: DeadLetterQueue,
}

impl Target {
    async fn open(args: &PipelineArgs) -> anyhow::Result<Self> {
        let (pipeline, endpoint, source) = resolve(args).await?;
        let state = plan::plan(&pipeline, Some(&endpoint.uri_vhost())).context(source)?;
        let timeout = Duration::from_secs(args.broker.timeout.max(1));
        let dlq = DeadLetterQueue::open(
            &endpoint,
            &state.topology.vhost,
            &state.names.dead_letter_queue,
            timeout,
        )
        .await
        .with_context(|| format!("{}: cannot open its DLQ", state.pipeline))?;
        Ok(Target { state, dlq })
    }

    fn queue(&self) -> &str {
        self.dlq.name()
    }
}

async fn list(args: &ListArgs) -> anyhow::Result<()> {
    let target = Target::open(&args.pipeline).await?;
    let browsed = target.dlq.browse(args.limit).await;
    let pipeline = target.state.pipeline.to_string();
    let vhost = target.state.topology.vhost.clone();
    let queue = target.queue().to_string();
    target.dlq.close().await;
    let browsed = browsed.with_context(|| format!("{pipeline}: cannot read {queue}"))?;
    let letters: Vec<DeadLetter> = browsed.letters.iter().map(DeadLetter::interpret).collect();
    let listing = DlqListing {
        groups: group(&letters, args.group_by),
        pipeline,
        vhost,
        queue,
        depth: browsed.depth,
        shown: letters.len(),
        group_by: args.group_by,
        dead_letters: letters,
    };
    match args.output {
        Some(format) => print_documents(&[listing], format),
        None => {
            print_listing(&listing);
            Ok(())
        }
    }
}

/// What `list -o json|yaml` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DlqListing {
    pipeline: String,
    vhost: String,
    queue: String,
    /// Dead letters in the DLQ when it was read.
    depth: u64,
    shown: usize,
    group_by: GroupBy,
    groups: Vec<FailureGroup>,
    dead_letters: Vec<DeadLetter>,
}

/// Widest error text a list row shows.
const ERROR_COLUMN: usize = 48;

fn print_listing(listing: &DlqListing) {
    let place = format!(
        "{}: DLQ {} (vhost {})",
        listing.pipeline, listing.queue, listing.vhost
    );
    if listing.depth == 0 {
        println!("{place} is empty");
        return;
    }
    let more = if (listing.shown as u64) < listing.depth {
        format!("; showing the first {} (--limit)", listing.shown)
    } else {
        String::new()
    };
    println!("{place} holds {} dead letters{more}", listing.depth);
    println!();
    print_dead_letters(&listing.dead_letters);
    println!();
    print_groups(&listing.groups, listing.group_by);
}

fn dash() -> String {
    "-".to_string()
}

fn optional_cell(value: &Option<String>, max: usize) -> String {
    value.as_deref().map_or_else(dash, |v| cell_text(v, max))
}

fn print_dead_letters(letters: &[DeadLetter]) {
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                format!("#{}", l.index),
                optional_cell(&l.message_id, 64),
                optional_cell(&l.reason, 32),
                l.attempts.map_or_else(dash, |a| a.to_string()),
                optional_cell(&l.error, ERROR_COLUMN),
                optional_cell(&l.first_failure, 40),
                optional_cell(&l.last_failure, 40),
                optional_cell(&l.original_routing_key, 64),
                l.size.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "#",
            "MESSAGE ID",
            "REASON",
            "ATTEMPTS",
            "ERROR",
            "FIRST FAILURE",
            "LAST FAILURE",
            "ROUTING KEY",
            "SIZE",
        ],
        &rows,
    );
}

fn print_groups(groups: &[FailureGroup], by: GroupBy) {
    let key_header = match by {
        GroupBy::Error => "ERROR",
        GroupBy::Reason => "REASON",
        GroupBy::RoutingKey => "ROUTING KEY",
    };
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let reasons = (!g.reasons.is_empty()).then(|| g.reasons.join(","));
            vec![
                g.count.to_string(),
                cell_text(&g.key, 72),
                optional_cell(&reasons, 40),
                optional_cell(&g.first_failure, 40),
                optional_cell(&g.last_failure, 40),
                format!("#{}", g.example),
            ]
        })
        .collect();
    print_table(
        &[
            "COUNT",
            key_header,
            "REASONS",
            "FIRST FAILURE",
            "LAST FAILURE",
            "EXAMPLE",
        ],
        &rows,
    );
}

async fn show(args: &ShowArgs) -> anyhow::Result<()> {
    let target = Target::open(&args.pipeline).await?;
    let browsed = target.dlq.browse(args.limit).await;
    let (pipeline, queue) = (
        target.state.pipeline.to_string(),
        target.queue().to_string(),
    );
    let vhost = target.state.topology.vhost.clone();
    target.dlq.close().await;
    let browsed = browsed.with_context(|| format!("{pipeline}: cannot read {queue}"))?;
    let matches = find(&browsed.letters, &args.id);
    let Some(raw) = matches.first() else {
        bail!(
            "{pipeline}: no dead letter {} among the first {} of the {} in {queue}{}",
            describe_selector(&args.id),
            browsed.letters.len(),
            browsed.depth,
            if (browsed.letters.len() as u64) < browsed.depth {
                " (raise --limit)"
            } else {
                ""
            }
        );
    };
    if matches.len() > 1 {
        eprintln!(
            "warning: {} dead letters have message id {:?}; showing #{}",
            matches.len(),
            args.id,
            raw.index
        );
    }
    let detail = DeadLetterDetail::of(raw);
    match args.output {
        Some(format) => print_documents(&[detail], format),
        None => {
            print_detail(&detail, raw, &queue, &vhost);
            Ok(())
        }
    }
}

/// Dead letters a `show` argument names: `#N` by position, anything else by message id.
fn find<'a>(letters: &'a [RawDeadLetter], id: &str) -> Vec<&'a RawDeadLetter> {
    if let Some(index) = id.strip_prefix('#').and_then(|n| n.parse::<usize>().ok()) {
        return letters.iter().filter(|l| l.index == index).collect();
    }
    letters
        .iter()
        .filter(|l| l.message_id() == Some(id))
        .collect()
}

fn describe_selector(id: &str) -> String {
    if id.starts_with('#') && id[1..].parse::<usize>().is_ok() {
        id.to_string()
    } else {
        format!("with message id {:?}", printable(id))
    }
}

fn print_detail(detail: &DeadLetterDetail, raw: &RawDeadLetter, queue: &str, vhost: &str) {
    let s = &detail.summary;
    println!("dead letter #{} of {queue} (vhost {vhost})", s.index);
    let field = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            println!("  {name:<22}{}", indent(&printable(&value), 24));
        }
    };
    field("message id:", s.message_id.clone());
    let source = s.reason_source.map(|r| format!(" ({})", serde_plain(&r)));
    field(
        "reason:",
        s.reason.clone().map(|r| r + &source.unwrap_or_default()),
    );
    field("attempts:", s.attempts.map(|a| a.to_string()));
    field("error:", s.error.clone());
    field("first failure:", s.first_failure.clone());
    field("last failure:", s.last_failure.clone());
    field("dead-lettered from:", s.dead_lettered_from.clone());
    field("original exchange:", s.original_exchange.clone());
    field("original routing key:", s.original_routing_key.clone());
    field(
        "replayed before:",
        Some(format!("{} times", s.replay_count)),
    );
    field(
        "arrived via:",
        Some(format!(
            "exchange {:?}, routing key {:?}",
            detail.exchange, detail.routing_key
        )),
    );
    println!("properties:");
    for (name, value) in &detail.properties {
        println!("  {name}: {}", printable(&json_text(value)));
    }
    println!("headers:");
    for (name, value) in &detail.headers {
        println!("  {}: {}", printable(name), printable(&json_text(value)));
    }
    if is_printable_text(&raw.body) {
        println!("body ({} bytes, text):", raw.body.len());
        let text = String::from_utf8_lossy(&raw.body);
        println!("{text}");
    } else {
        println!("body ({} bytes, binary, hex):", raw.body.len());
        print!("{}", hex_dump(&raw.body));
    }
}

/// A JSON value as a header line shows it: strings bare, the rest as compact JSON.
fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn replay(args: &ReplayArgs) -> anyhow::Result<()> {
    let run = replay_run(args)?;
    let stop = stop_rule(args)?;
    if args.as_resource {
        let resource = replay_resource(args, &run, stop.as_ref())?;
        let yaml = serde_saphyr::to_string(&resource).context("cannot encode the resource")?;
        print!("{yaml}");
        return Ok(());
    }
    let target = Target::open(&args.pipeline).await?;
    let result = replay_with(&target, &run, stop).await;
    target.dlq.close().await;
    result
}

/// `--stop-when` and `--stop-min-sample` as a rule; a bad value names the flag.
fn stop_rule(args: &ReplayArgs) -> anyhow::Result<Option<StopWhen>> {
    let Some(text) = &args.stop_when else {
        return Ok(None);
    };
    let mut rule: StopWhen = text
        .parse()
        .map_err(|e| anyhow::anyhow!("--stop-when {e}"))?;
    if args.stop_min_sample == 0 {
        bail!("--stop-min-sample 0: expected at least 1");
    }
    rule.min_sample = args.stop_min_sample;
    Ok(Some(rule))
}

/// The DeadLetterReplay the flags describe (what `--as-resource` prints).
fn replay_resource(
    args: &ReplayArgs,
    run: &ReplayRun,
    stop: Option<&StopWhen>,
) -> anyhow::Result<DeadLetterReplay> {
    let (pipeline, namespace) = resource_pipeline(&args.pipeline)?;
    let rate = run
        .rate
        .map(|rate| {
            let whole = rate.round();
            if (whole - rate).abs() > f64::EPSILON || whole < 1.0 || whole > f64::from(REPLAY_RATE_MAX) {
                bail!("--rate {rate}: a DeadLetterReplay takes whole messages per second, 1 to {REPLAY_RATE_MAX}");
            }
            Ok(whole as u32)
        })
        .transpose()?;
    let selection = &run.selection;
    let spec = DeadLetterReplaySpec {
        pipeline_ref: PipelineRef {
            name: pipeline.clone(),
        },
        selection: ReplaySelectionSpec {
            reason: selection.reason.clone(),
            error_matches: args.error_matches.clone(),
            failed_after: selection.failed_after.map(Time),
            failed_before: selection.failed_before.map(Time),
            message_ids: args.ids.clone(),
            limit: args.limit.map(|l| l as u64),
        },
        rate,
        stop_when: stop.map(|rule| StopWhenSpec {
            failed_again_percent: rule.percent,
            window: crate::api::Duration::from_millis(
                u64::try_from(rule.window.as_millis()).unwrap_or(u64::MAX),
            ),
            min_sample: Some(rule.min_sample),
        }),
        suspend: false,
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = args
        .resource_name
        .clone()
        .unwrap_or_else(|| format!("{pipeline}-replay-{}", now.strftime("%Y%m%d-%H%M%S")));
    let mut resource = DeadLetterReplay::new(&name, spec);
    resource.metadata.namespace = namespace;
    Ok(resource)
}

/// The pipeline's name and namespace, from the manifest or the flags, without a cluster.
fn resource_pipeline(args: &PipelineArgs) -> anyhow::Result<(String, Option<String>)> {
    if let Some(file) = &args.file {
        let (pipeline, _) = pick_pipeline(file, args.pipeline.as_deref())?;
        let name = pipeline.metadata.name.clone().unwrap_or_default();
        return Ok((name, pipeline.metadata.namespace.clone()));
    }
    match &args.name {
        Some(name) => Ok((name.clone(), args.namespace.clone())),
        None => bail!("no pipeline given: use -f FILE or --name NAME"),
    }
}

/// The replay the flags ask for; a bad flag value is an error naming the flag.
fn replay_run(args: &ReplayArgs) -> anyhow::Result<ReplayRun> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let ago = |flag: &str, text: &Option<String>| -> anyhow::Result<Option<_>> {
        text.as_deref()
            .map(|t| {
                let duration = t
                    .parse::<crate::api::duration::Duration>()
                    .map_err(|e| anyhow::anyhow!("--{flag} {t:?}: {e}"))?;
                let span = k8s_openapi::jiff::SignedDuration::try_from(duration.as_std())
                    .map_err(|e| anyhow::anyhow!("--{flag} {t:?}: {e}"))?;
                now.checked_sub(span)
                    .map_err(|e| anyhow::anyhow!("--{flag} {t:?}: {e}"))
            })
            .transpose()
    };
    let error_matches = args
        .error_matches
        .as_deref()
        .map(|re| {
            regex::Regex::new(re).map_err(|e| {
                anyhow::anyhow!("--error-matches {re:?}: not a regular expression: {e}")
            })
        })
        .transpose()?;
    let selection = ReplaySelection {
        ids: (!args.ids.is_empty()).then(|| args.ids.iter().cloned().collect()),
        reason: args.reason.clone(),
        error_matches,
        failed_before: ago("older-than", &args.older_than)?,
        failed_after: ago("newer-than", &args.newer_than)?,
        limit: args.limit,
        replay_id: args.resume.clone(),
    };
    let rate = args.rate.as_deref().map(parse_rate).transpose()?;
    let replay_id = args
        .resume
        .clone()
        .unwrap_or_else(|| format!("replay-{}", now.as_millisecond()));
    Ok(ReplayRun {
        selection,
        rate,
        replay_id,
        dry_run: args.dry_run,
    })
}

/// `N/s` or `N` (per second), N > 0.
fn parse_rate(text: &str) -> anyhow::Result<f64> {
    let number = text.trim().strip_suffix("/s").unwrap_or(text.trim());
    match number.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => bail!("--rate {text:?}: expected a positive number per second, e.g. 50/s"),
    }
}

/// The CLI's side of a replay: prints each copy, and runs the kill switch when asked.
struct Progress {
    verb: &'static str,
    watch: Option<FailureWatch>,
    trip: Option<Trip>,
    error: Option<crate::dlq::DlqError>,
}

impl ReplayControl for Progress {
    async fn before_copy(&mut self, dlq: &DeadLetterQueue, _: &ReplayOutcome) -> Flow {
        let Some(watch) = &mut self.watch else {
            return Flow::Continue;
        };
        let now = Instant::now();
        if !watch.due(now) {
            return Flow::Continue;
        }
        watch.start_interval(now);
        match watch.check(dlq).await {
            Ok(None) => Flow::Continue,
            Ok(Some(trip)) => {
                self.trip = Some(trip);
                Flow::Halt
            }
            Err(error) => {
                self.error = Some(error);
                Flow::Halt
            }
        }
    }

    fn replayed(&mut self, letter: &DeadLetter, to: &replay::ReplayTarget) {
        println!(
            "{} {} -> {}",
            self.verb,
            describe_letter(letter),
            describe_target(to)
        );
        if let Some(watch) = &mut self.watch {
            watch.replayed(Instant::now());
        }
    }
}

/// How often `--stop-when` counts the copies back in the DLQ.
const STOP_CHECK_INTERVAL: Duration = Duration::from_secs(1);

async fn replay_with(
    target: &Target,
    run: &ReplayRun,
    stop: Option<StopWhen>,
) -> anyhow::Result<()> {
    let pipeline = &target.state.pipeline;
    let verb = if run.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    if !run.dry_run {
        println!(
            "{pipeline}: replay id {} (run again with --resume {} to go on after an interruption)",
            run.replay_id, run.replay_id
        );
    }
    let watch = match stop {
        Some(rule) if !run.dry_run => {
            // Copies of a resumed replay already back in the DLQ are not new failures.
            let tap = target
                .dlq
                .tap(&target.state.names.dead_letter_exchange)
                .await
                .with_context(|| pipeline.to_string())?;
            let back = target
                .dlq
                .count_replay_copies(&run.replay_id)
                .await
                .with_context(|| pipeline.to_string())?;
            Some(FailureWatch::new(
                Some(rule),
                &run.replay_id,
                STOP_CHECK_INTERVAL,
                back,
                Some(tap),
            ))
        }
        _ => None,
    };
    let mut progress = Progress {
        verb,
        watch,
        trip: None,
        error: None,
    };
    let outcome = target
        .dlq
        .replay_with(run, &target.state.names, &mut progress)
        .await
        .with_context(|| pipeline.to_string())?;
    if let Some(error) = progress.error {
        bail!(
            "{pipeline}: replay {} halted after {} dead letters: cannot count the copies back in the DLQ for --stop-when: {error}; resume with --resume {}",
            run.replay_id,
            outcome.replayed,
            run.replay_id
        );
    }
    if let (Some(trip), Some(rule)) = (progress.trip, stop) {
        bail!(
            "{pipeline}: replay {} stopped by --stop-when {rule}: {trip}; {} replayed, {} dead letters now in {} (resume with --resume {})",
            run.replay_id,
            outcome.replayed,
            outcome.remaining,
            target.queue(),
            run.replay_id
        );
    }
    let dry = if run.dry_run {
        " (dry run: nothing was changed)"
    } else {
        ""
    };
    println!(
        "{pipeline}: {verb} {} of the {} dead letters in {} to queue {}; skipped {}, {} remaining in the DLQ{dry}",
        outcome.replayed,
        outcome.depth,
        target.queue(),
        target.state.names.queue,
        outcome.skipped,
        outcome.remaining,
    );
    Ok(())
}

fn describe_letter(letter: &DeadLetter) -> String {
    match &letter.message_id {
        Some(id) => format!("#{} {}", letter.index, printable(id)),
        None => format!("#{} (no message id)", letter.index),
    }
}

fn describe_target(to: &replay::ReplayTarget) -> String {
    format!(
        "queue {} (original routing key {:?})",
        to.queue,
        printable(&to.original_routing_key)
    )
}

async fn purge(args: &PurgeArgs) -> anyhow::Result<()> {
    // Decided before any broker call: a script without --yes must not get this far.
    let interactive = std::io::stdin().is_terminal();
    if !args.yes && !interactive {
        bail!(
            "refusing to purge without --yes: standard input is not a terminal, so there is no one to confirm"
        );
    }
    let target = Target::open(&args.pipeline).await?;
    let result = purge_confirmed(&target, args.yes).await;
    target.dlq.close().await;
    result
}

async fn purge_confirmed(target: &Target, yes: bool) -> anyhow::Result<()> {
    let pipeline = &target.state.pipeline;
    let queue = target.queue().to_string();
    if !yes {
        let depth = target
            .dlq
            .depth()
            .await
            .with_context(|| pipeline.to_string())?;
        eprint!(
            "{pipeline}: this deletes the {depth} dead letters in {queue} (vhost {}) for good.\nType the queue name to confirm: ",
            target.state.topology.vhost
        );
        let answer = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .context("cannot read the confirmation")?
        .context("cannot read the confirmation")?;
        if answer.trim() != queue {
            bail!("{pipeline}: not confirmed; nothing was purged");
        }
    }
    let purged = target
        .dlq
        .purge()
        .await
        .with_context(|| format!("{pipeline}: cannot purge {queue}"))?;
    println!("{pipeline}: purged {purged} dead letters from {queue}");
    Ok(())
}

/// The pipeline, its broker, and where the pipeline came from (for errors).
async fn resolve(args: &PipelineArgs) -> anyhow::Result<(MessagePipeline, BrokerEndpoint, String)> {
    if let Some(file) = &args.file {
        let (pipeline, source) = pick_pipeline(file, args.pipeline.as_deref())?;
        return Ok((pipeline, args.broker.endpoint()?, source));
    }
    let Some(name) = &args.name else {
        bail!("no pipeline given: use -f FILE or --name NAME");
    };
    from_cluster(args, name).await
}

fn pick_pipeline(
    file: &PathBuf,
    wanted: Option<&str>,
) -> anyhow::Result<(MessagePipeline, String)> {
    let mut found = read_pipelines(std::slice::from_ref(file))?;
    let source = file.display().to_string();
    let label = |p: &MessagePipeline| {
        format!(
            "{}/{}",
            p.metadata
                .namespace
                .as_deref()
                .unwrap_or(plan::DEFAULT_NAMESPACE),
            p.metadata.name.as_deref().unwrap_or_default()
        )
    };
    if let Some(wanted) = wanted {
        found.retain(|s| {
            s.pipeline.metadata.name.as_deref() == Some(wanted) || label(&s.pipeline) == wanted
        });
    }
    match found.len() {
        1 => Ok((found.remove(0).pipeline, source)),
        0 => match wanted {
            Some(wanted) => bail!("{source}: no pipeline named {wanted:?}"),
            None => bail!("{source}: no MessagePipeline in the file"),
        },
        _ => {
            let names: Vec<String> = found.iter().map(|s| label(&s.pipeline)).collect();
            bail!(
                "{source}: holds {} pipelines ({}); pick one with --pipeline NAME",
                names.len(),
                names.join(", ")
            )
        }
    }
}

/// Reads the MessagePipeline and (unless a broker flag overrides it) its broker Secret.
async fn from_cluster(
    args: &PipelineArgs,
    name: &str,
) -> anyhow::Result<(MessagePipeline, BrokerEndpoint, String)> {
    install_crypto_provider();
    let timeout = Duration::from_secs(args.broker.timeout.max(1));
    // Display only: the error's source chain repeats the same text several times.
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes cluster: {e}"))?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let source = format!("MessagePipeline {namespace}/{name}");
    let pipelines: kube::Api<MessagePipeline> = kube::Api::namespaced(client.clone(), &namespace);
    let pipeline = with_timeout(timeout, &format!("read {source}"), pipelines.get_opt(name))
        .await?
        .with_context(|| format!("{source} does not exist"))?;
    let broker = &args.broker;
    if broker.uri.is_some() || broker.secret_file.is_some() {
        return Ok((pipeline, broker.endpoint()?, source));
    }
    let Some(secret_ref) = &pipeline.spec.broker.secret_ref else {
        // A MessageBroker's credentials live in the operator's namespace: read them as the
        // operator does, if this user may.
        let access = crate::k8s::BrokerAccess {
            operator_namespace: args.operator_namespace.clone(),
            ..crate::k8s::BrokerAccess::default()
        };
        let resolved = tokio::time::timeout(
            timeout,
            crate::k8s::resolve_broker(&client, &access, &pipeline),
        )
        .await
        .map_err(|_| anyhow::anyhow!("cannot read the MessageBroker of {source}: no answer from the Kubernetes API within {}s", timeout.as_secs()))?
        .with_context(|| format!("the broker of {source} (spec.broker.brokerRef)"))?;
        return Ok((pipeline, resolved.endpoint, source));
    };
    let secret_name = &secret_ref.name;
    let secret_label = format!("broker Secret {namespace}/{secret_name}");
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    let secret = with_timeout(
        timeout,
        &format!("read {secret_label}"),
        secrets.get_opt(secret_name),
    )
    .await?
    .with_context(|| {
        format!("{secret_label} (spec.broker.secretRef of {source}) does not exist")
    })?;
    let data = crate::k8s::secret_text(secret)
        .map_err(|reason| anyhow::anyhow!("{secret_label}: {reason}"))?;
    let endpoint = BrokerEndpoint::from_secret_data(
        &data,
        broker.management_uri.as_deref(),
        broker.ca_from_file()?,
    )
    .with_context(|| secret_label.clone())?;
    Ok((pipeline, endpoint, source))
}

async fn with_timeout<T>(
    timeout: Duration,
    operation: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => bail!(
            "cannot {operation}: no answer from the Kubernetes API within {}s",
            timeout.as_secs()
        ),
        Ok(result) => {
            result.map_err(|e| anyhow::anyhow!("cannot {operation}: {}", crate::k8s::plain(&e)))
        }
    }
}

/// Text from a message made safe for a terminal: control characters (escape sequences
/// included) are shown escaped, except newlines and tabs.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One table cell: on one line, printable, at most `max` characters.
fn cell_text(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let safe = printable(&one_line);
    if safe.chars().count() <= max {
        return safe;
    }
    let cut: String = safe.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}

/// Continuation lines of a multi-line value, indented under the first.
fn indent(text: &str, width: usize) -> String {
    text.lines()
        .collect::<Vec<_>>()
        .join(&format!("\n{}", " ".repeat(width)))
}

/// Columns separated by three spaces, like kubectl.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_one_printable_line_cut_to_width() {
        assert_eq!(cell_text("db\n  timeout", 20), "db timeout");
        assert_eq!(cell_text("\u{1b}[31mred", 40), "\\u{1b}[31mred");
        assert_eq!(cell_text("abcdefghij", 8), "abcde...");
        assert_eq!(printable("line\nnext\u{7}"), "line\nnext\\u{7}");
    }

    #[test]
    fn show_finds_by_position_or_message_id() {
        let raw = |index: usize, id: &str| RawDeadLetter {
            index,
            exchange: String::new(),
            routing_key: String::new(),
            properties: lapin::BasicProperties::default().with_message_id(id.into()),
            body: Vec::new(),
        };
        let letters = [raw(1, "a"), raw(2, "#1"), raw(3, "a")];
        let found =
            |id: &str| -> Vec<usize> { find(&letters, id).iter().map(|l| l.index).collect() };
        assert_eq!(found("#2"), [2]);
        assert_eq!(found("a"), [1, 3]);
        assert_eq!(found("#9"), Vec::<usize>::new());
        assert_eq!(describe_selector("#2"), "#2");
        assert_eq!(describe_selector("m-1"), "with message id \"m-1\"");
    }
}
