//! The replay kill switch: stop a replay when too many of its copies come back to the DLQ.
//!
//! The rule (`--stop-when 10%/5m`, `spec.stopWhen`) reads: stop when, over the last `window`,
//! more than `percent` % of the copies made came back as dead letters, once at least
//! `min_sample` copies were made in that window. "Came back" is counted from the DLQ itself:
//! the number of dead letters carrying this replay's id (`x-msgpipe-replay-id`, kept by the
//! client library and by the broker when they dead-letter a copy again), counted once in the
//! DLQ and then followed through a tap on the dead-letter exchange, is read every
//! `check interval`, and each increase is dated to the read that saw it.
//!
//! [`KillSwitch`] is pure (instants are passed in) so the decision is unit-tested without a
//! broker; [`FailureWatch`] adds the periodic DLQ read.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::{DeadLetterQueue, DeadLetterTap, DlqError};

/// Copies made in the window before the ratio counts, when the rule does not say.
pub const DEFAULT_MIN_SAMPLE: u64 = 20;

/// When to stop a replay: more than `percent` % of the copies made in the last `window`
/// came back to the DLQ, with at least `min_sample` copies in that window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StopWhen {
    /// 0 < percent <= 100.
    pub percent: f64,
    pub window: Duration,
    pub min_sample: u64,
}

/// Why a `--stop-when` text is not a rule; the message names the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {problem} (expected PERCENT%/DURATION, e.g. 10%/5m)")]
pub struct ParseStopWhenError {
    text: String,
    problem: &'static str,
}

impl FromStr for StopWhen {
    type Err = ParseStopWhenError;

    /// `10%/5m`, `2.5%/30s`: a percentage and a duration (`ms`, `s`, `m`, `h`, `d`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |problem| ParseStopWhenError {
            text: text.to_string(),
            problem,
        };
        let (percent, window) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| error("no '/' between the percentage and the window"))?;
        let percent = percent
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| error("the percentage must end with '%'"))?
            .trim()
            .parse::<f64>()
            .map_err(|_| error("the percentage is not a number"))?;
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(error("the percentage must be above 0 and at most 100"));
        }
        let window = window
            .trim()
            .parse::<crate::api::Duration>()
            .map_err(|_| error("the window is not a duration such as 5m"))?
            .as_std();
        if window.is_zero() {
            return Err(error("the window must be longer than 0"));
        }
        Ok(StopWhen {
            percent,
            window,
            min_sample: DEFAULT_MIN_SAMPLE,
        })
    }
}

impl fmt::Display for StopWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = crate::api::Duration::from_millis(
            u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX),
        );
        write!(f, "{}%/{window}", self.percent)
    }
}

/// The kill switch tripped: what it saw in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trip {
    pub failed_again: u64,
    pub replayed: u64,
}

impl fmt::Display for Trip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of the {} copies made in the window came back to the DLQ",
            self.failed_again, self.replayed
        )
    }
}

/// Copies made and copies seen back, in one-second buckets (memory grows with the window in
/// seconds, not with the rate).
#[derive(Debug)]
pub struct KillSwitch {
    rule: StopWhen,
    replays: VecDeque<(Instant, u64)>,
    failures: VecDeque<(Instant, u64)>,
    /// Dead letters carrying the replay id at the last read.
    seen_back: u64,
}

impl KillSwitch {
    /// `already_back`: copies of this replay in the DLQ before this run (a resumed run); they
    /// are not new failures.
    pub fn new(rule: StopWhen, already_back: u64) -> Self {
        Self {
            rule,
            replays: VecDeque::new(),
            failures: VecDeque::new(),
            seen_back: already_back,
        }
    }

    /// One copy was made (confirmed) at `at`.
    pub fn replayed(&mut self, at: Instant) {
        add(&mut self.replays, at, 1);
    }

    /// `back` dead letters carry the replay id at `at`; an increase is that many new failures.
    pub fn observe_back(&mut self, back: u64, at: Instant) {
        let new = back.saturating_sub(self.seen_back);
        self.seen_back = back;
        if new > 0 {
            add(&mut self.failures, at, new);
        }
    }

    /// Whether the rule holds at `now`.
    pub fn tripped(&mut self, now: Instant) -> Option<Trip> {
        let window = self.rule.window;
        let replayed = recent(&mut self.replays, now, window);
        let failed_again = recent(&mut self.failures, now, window);
        let over = failed_again as f64 * 100.0 > self.rule.percent * replayed as f64;
        (replayed >= self.rule.min_sample && replayed > 0 && over).then_some(Trip {
            failed_again,
            replayed,
        })
    }
}

fn add(buckets: &mut VecDeque<(Instant, u64)>, at: Instant, count: u64) {
    match buckets.back_mut() {
        Some((start, total)) if at.saturating_duration_since(*start) < Duration::from_secs(1) => {
            *total += count;
        }
        _ => buckets.push_back((at, count)),
    }
}

/// Drops buckets older than `window` and sums the rest.
fn recent(buckets: &mut VecDeque<(Instant, u64)>, now: Instant, window: Duration) -> u64 {
    while buckets
        .front()
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) > window)
    {
        buckets.pop_front();
    }
    buckets.iter().map(|(_, count)| count).sum()
}

/// The kill switch with its DLQ read, meant to run once per `interval` ([`Self::due`]).
#[derive(Debug)]
pub struct FailureWatch {
    pub switch: Option<KillSwitch>,
    replay_id: String,
    interval: Duration,
    last_read: Option<Instant>,
    /// Dead letters carrying the replay id at the last read.
    pub back: u64,
    /// Follows new dead letters; without it every check reads the whole DLQ.
    tap: Option<DeadLetterTap>,
}

impl FailureWatch {
    /// `back`: copies of this replay in the DLQ now; `tap`, opened before `back` was counted,
    /// sees the ones that arrive after.
    pub fn new(
        rule: Option<StopWhen>,
        replay_id: &str,
        interval: Duration,
        back: u64,
        tap: Option<DeadLetterTap>,
    ) -> Self {
        Self {
            switch: rule.map(|rule| KillSwitch::new(rule, back)),
            replay_id: replay_id.to_string(),
            interval,
            last_read: None,
            back,
            tap,
        }
    }

    /// Whether a DLQ read is due.
    pub fn due(&self, now: Instant) -> bool {
        self.last_read
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval)
    }

    /// Starts the next interval without reading the DLQ.
    pub fn start_interval(&mut self, now: Instant) {
        self.last_read = Some(now);
    }

    /// A copy was made.
    pub fn replayed(&mut self, at: Instant) {
        if let Some(switch) = &mut self.switch {
            switch.replayed(at);
        }
    }

    /// Reads the DLQ and decides (callers ask [`Self::due`] first).
    pub async fn check(&mut self, dlq: &DeadLetterQueue) -> Result<Option<Trip>, DlqError> {
        let now = Instant::now();
        self.back = match &self.tap {
            Some(tap) => self.back + dlq.drain_tap(tap, &self.replay_id).await?,
            None => dlq.count_replay_copies(&self.replay_id).await?,
        };
        Ok(self.switch.as_mut().and_then(|switch| {
            switch.observe_back(self.back, now);
            switch.tripped(now)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_when_parses_percent_and_window_and_names_the_problem() {
        let rule: StopWhen = "10%/5m".parse().expect("rule");
        assert_eq!(rule.percent, 10.0);
        assert_eq!(rule.window, Duration::from_secs(300));
        assert_eq!(rule.min_sample, DEFAULT_MIN_SAMPLE);
        assert_eq!(rule.to_string(), "10%/5m");
        let half: StopWhen = " 2.5% / 30s ".parse().expect("spaces");
        assert_eq!((half.percent, half.window.as_secs()), (2.5, 30));
        for (text, problem) in [
            ("10/5m", "must end with '%'"),
            ("10%", "no '/'"),
            ("x%/5m", "not a number"),
            ("0%/5m", "above 0"),
            ("150%/5m", "at most 100"),
            ("10%/five", "not a duration"),
            ("10%/0s", "longer than 0"),
        ] {
            let error = text.parse::<StopWhen>().expect_err(text).to_string();
            assert!(error.contains(problem), "{text}: {error}");
            assert!(!error.contains('\n'));
        }
    }

    fn rule(percent: f64, min_sample: u64) -> StopWhen {
        StopWhen {
            percent,
            window: Duration::from_secs(60),
            min_sample,
        }
    }

    #[test]
    fn trips_above_the_ratio_only_once_the_sample_is_big_enough() {
        let start = Instant::now();
        let mut switch = KillSwitch::new(rule(10.0, 20), 0);
        for i in 0..10 {
            switch.replayed(start + Duration::from_millis(i * 10));
        }
        switch.observe_back(5, start + Duration::from_millis(200));
        assert_eq!(
            switch.tripped(start + Duration::from_millis(200)),
            None,
            "50% but only 10 copies: below the minimum sample"
        );
        for i in 0..10 {
            switch.replayed(start + Duration::from_millis(300 + i * 10));
        }
        assert_eq!(
            switch.tripped(start + Duration::from_millis(500)),
            Some(Trip {
                failed_again: 5,
                replayed: 20
            })
        );
    }

    #[test]
    fn exactly_the_percentage_does_not_trip_and_old_failures_leave_the_window() {
        let start = Instant::now();
        let mut switch = KillSwitch::new(rule(10.0, 10), 0);
        for _ in 0..100 {
            switch.replayed(start);
        }
        switch.observe_back(10, start);
        assert_eq!(
            switch.tripped(start),
            None,
            "10 of 100 is not more than 10%"
        );
        switch.observe_back(11, start);
        assert!(switch.tripped(start).is_some(), "11 of 100 is");
        // Two minutes later, with a 1-minute window, fresh copies that all succeed.
        let later = start + Duration::from_secs(120);
        for _ in 0..50 {
            switch.replayed(later);
        }
        switch.observe_back(11, later);
        assert_eq!(
            switch.tripped(later),
            None,
            "the old failures left the window"
        );
    }

    #[test]
    fn copies_back_before_a_resumed_run_are_not_new_failures() {
        let start = Instant::now();
        let mut switch = KillSwitch::new(rule(10.0, 5), 40);
        for _ in 0..10 {
            switch.replayed(start);
        }
        switch.observe_back(40, start);
        assert_eq!(switch.tripped(start), None);
        // A purge lowers the count: no negative failures, and the next increase counts.
        switch.observe_back(0, start);
        switch.observe_back(3, start);
        assert_eq!(
            switch.tripped(start),
            Some(Trip {
                failed_again: 3,
                replayed: 10
            })
        );
    }
}
